"""Tokenizers: SentencePiece models (LLaMA style) and Hugging Face ``tokenizers`` JSON files.

Both expose the attributes megatron-core's GPTDataset reads (``vocab_size``, ``eod``, ``pad``,
``unique_identifiers``) plus batch encoding for preprocessing. Nothing here imports torch or
megatron-core, so preprocessing workers start fast.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_tempnet.config import ConfigError, padded_vocab_size

SENTENCEPIECE = "sentencepiece"
HUGGINGFACE = "huggingface"
# Megatron-LM's --tokenizer-type names, mapped onto the two families implemented here.
TOKENIZER_TYPES = {
    SENTENCEPIECE: SENTENCEPIECE,
    "SentencePieceTokenizer": SENTENCEPIECE,
    "GPTSentencePieceTokenizer": SENTENCEPIECE,
    "Llama2Tokenizer": SENTENCEPIECE,
    HUGGINGFACE: HUGGINGFACE,
    "HuggingFaceTokenizer": HUGGINGFACE,
    "hf": HUGGINGFACE,
}
# Tried in order when a tokenizers JSON file is given no explicit eod token.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "[BOS]")
# megatron-core's "no pad token" id (megatron_dataset._PAD_TOKEN_ID).
NO_PAD_ID = -1


class TokenizerError(ConfigError):
    """A tokenizer that cannot be loaded or used; the message names the file and the fix."""


@dataclass
class TokenizerConfig:
    """Which tokenizer to load. ``type`` accepts Megatron's --tokenizer-type names too."""

    type: str
    model: str | None  # SentencePiece .model file, or tokenizers JSON file (or its directory)
    eod_token: str | None = None  # default: the model's eos (SentencePiece) or a known eod piece
    bos_token: str | None = None
    pad_token: str | None = None


class Tokenizer(ABC):
    """Text <-> ids with the special ids a GPT pipeline needs."""

    path: str
    vocab_size: int
    eod: int
    bos: int | None
    pad_id: int | None

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        ...

    @abstractmethod
    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        ...

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        ...

    @property
    def pad(self) -> int:
        """The pad id, or megatron-core's "none" value (-1) when the vocabulary has none."""
        return NO_PAD_ID if self.pad_id is None else self.pad_id

    @property
    def unique_identifiers(self) -> dict:
        """What megatron-core hashes (with the data) to name its cached sample indices."""
        return {"class": type(self).__name__, "path": os.path.abspath(self.path),
                "vocab_size": self.vocab_size, "eod": self.eod}

    def encode_documents(self, texts: Sequence[str], dtype, append_eod: bool
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize a batch: (all ids concatenated as ``dtype``, per-document lengths int32).

        Empty documents give zero tokens and no eod (as Megatron's preprocess_data.py).
        """
        encoded = self.tokenize_batch(texts)
        if append_eod:
            for ids in encoded:
                if ids:
                    ids.append(self.eod)
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int32, count=len(encoded))
        flat = np.fromiter((t for ids in encoded for t in ids), dtype=dtype,
                           count=int(lengths.sum()))
        return flat, lengths

    def padded_vocab_size(self, make_vocab_size_divisible_by: int = 128,
                          tensor_parallel_size: int = 1) -> int:
        return padded_vocab_size(self.vocab_size, make_vocab_size_divisible_by,
                                 tensor_parallel_size)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; eod is the model's eos (``</s>``), bos its ``<s>`` (LLaMA)."""

    def __init__(self, path: str, eod_token: str | None = None, bos_token: str | None = None,
                 pad_token: str | None = None):
        import sentencepiece

        self.path = str(path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path} is not a readable SentencePiece model ({e}); "
                                 f"train one with tools/train_tokenizer.py") from e
        self.vocab_size = self._sp.vocab_size()
        self.eod = self._special(eod_token, self._sp.eos_id(), "eod")
        self.bos = self._special(bos_token, self._sp.bos_id(), "bos", required=False)
        self.pad_id = self._special(pad_token, self._sp.pad_id(), "pad", required=False)

    def _special(self, piece: str | None, default: int, what: str, required: bool = True):
        if piece is not None:
            pid = self._sp.piece_to_id(piece)
            if pid == self._sp.unk_id() and piece != self._sp.id_to_piece(pid):
                raise TokenizerError(f"{self.path}: {what} token {piece!r} is not in the vocabulary")
            return pid
        if default >= 0:
            return default
        if required:
            raise TokenizerError(f"{self.path} defines no eos piece to use as end-of-document; "
                                 f"pass eod_token=<a piece of the vocabulary>")
        return None

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: preprocessing parallelises over worker processes instead.
        return self._sp.encode(list(texts), out_type=int, num_threads=1)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` JSON file (GPT-2 byte-level BPE, LLaMA-3, ...).

    Documents are encoded without the file's post-processor specials (no automatic bos/eos):
    the pipeline adds eod itself, as Megatron does.
    """

    def __init__(self, path: str, eod_token: str | None = None, bos_token: str | None = None,
                 pad_token: str | None = None):
        import tokenizers

        self.path = str(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception for unparsable files
            raise TokenizerError(f"{self.path} is not a readable tokenizers JSON file ({e}); "
                                 f"train one with tools/train_tokenizer.py") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = self._special(eod_token, EOD_CANDIDATES, "eod")
        self.bos = self._special(bos_token, BOS_CANDIDATES, "bos", required=False)
        self.pad_id = self._special(pad_token, PAD_CANDIDATES, "pad", required=False)

    def _special(self, token: str | None, candidates: Sequence[str], what: str,
                 required: bool = True) -> int | None:
        if token is not None:
            tid = self._tok.token_to_id(token)
            if tid is None:
                raise TokenizerError(f"{self.path}: {what} token {token!r} is not in the vocabulary")
            return tid
        for candidate in candidates:
            tid = self._tok.token_to_id(candidate)
            if tid is not None:
                return tid
        if required:
            raise TokenizerError(f"{self.path} has none of the end-of-document tokens "
                                 f"{list(candidates)}; pass eod_token=<a token of the vocabulary>")
        return None

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def resolve_tokenizer_type(name: str) -> str:
    try:
        return TOKENIZER_TYPES[name]
    except KeyError:
        raise TokenizerError(f"unknown tokenizer type {name!r}; choose one of "
                             f"{sorted(TOKENIZER_TYPES)}") from None


def resolve_model_path(kind: str, model: str | None) -> Path:
    if not model:
        raise TokenizerError("no tokenizer model given: pass --tokenizer-model <file>; train one "
                             "with tools/train_tokenizer.py")
    path = Path(model)
    if kind == HUGGINGFACE and path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        hint = ("a SentencePiece .model file" if kind == SENTENCEPIECE
                else "a tokenizers JSON file or a directory holding tokenizer.json")
        raise TokenizerError(f"tokenizer model {str(path)!r} not found: expected {hint}; "
                             f"train one with tools/train_tokenizer.py or fix the path")
    return path


def build_tokenizer(config: TokenizerConfig) -> Tokenizer:
    """The tokenizer a TokenizerConfig names; errors name the missing or unreadable file."""
    kind = resolve_tokenizer_type(config.type)
    path = resolve_model_path(kind, config.model)
    cls = SentencePieceTokenizer if kind == SENTENCEPIECE else HuggingFaceTokenizer
    return cls(str(path), eod_token=config.eod_token, bos_token=config.bos_token,
               pad_token=config.pad_token)


def load_tokenizer(type: str, model: str | None, **special_tokens) -> Tokenizer:
    """Shorthand for build_tokenizer(TokenizerConfig(type, model, ...))."""
    return build_tokenizer(TokenizerConfig(type=type, model=model, **special_tokens))


def token_dtype(vocab_size: int):
    """The .bin token dtype: uint16 below 65500 ids, else int32 (megatron-core's rule)."""
    return np.uint16 if vocab_size < 65500 else np.int32
