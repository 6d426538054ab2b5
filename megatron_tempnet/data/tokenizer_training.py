"""Train tokenizers from JSONL or plain-text files: SentencePiece (BPE or unigram, LLaMA-style
byte fallback) or GPT-2-style byte-level BPE. This is how tests and the demo get tokenizers.
"""
from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

from megatron_tempnet.data.jsonl import (JSONL_SUFFIXES, expand_inputs, is_blank, iter_documents,
                                         iter_lines)

TEXT_SUFFIXES = (".txt", ".txt.gz")
TRAINING_TYPES = ("sentencepiece-bpe", "sentencepiece-unigram", "byte-level-bpe")
# LLaMA's layout, plus a pad piece so that batches can be padded without reusing eos.
SP_SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
BYTE_LEVEL_SPECIALS = ("<|endoftext|>", "<|pad|>")


@dataclass
class TokenizerTrainingConfig:
    inputs: Sequence[str]  # .jsonl[.gz] (text under json_key) or .txt[.gz] files, dirs, globs
    output: str  # the .model (SentencePiece) or .json (byte-level BPE) file to write
    type: str = "sentencepiece-bpe"
    vocab_size: int = 32000
    json_key: str = "text"
    byte_fallback: bool = True  # SentencePiece: unknown characters become byte pieces
    max_documents: int | None = None  # train on the first N documents only
    num_threads: int = 2

    def validate(self) -> "TokenizerTrainingConfig":
        if self.type not in TRAINING_TYPES:
            raise ValueError(f"--type {self.type!r}: choose one of {TRAINING_TYPES}")
        if self.vocab_size < 1:
            raise ValueError(f"--vocab-size {self.vocab_size}: must be positive")
        return self


def iter_training_texts(config: TokenizerTrainingConfig) -> Iterator[str]:
    texts = itertools.chain.from_iterable(
        _iter_file_texts(path, config.json_key)
        for path in expand_inputs(config.inputs, JSONL_SUFFIXES + TEXT_SUFFIXES))
    return itertools.islice(texts, config.max_documents)


def _iter_file_texts(path: str, json_key: str) -> Iterator[str]:
    if path.endswith(TEXT_SUFFIXES):
        for line_no, line in iter_lines(path):
            if not is_blank(line):
                yield line.decode("utf-8", errors="replace").rstrip("\n")
    else:
        yield from iter_documents([path], json_key)


def train_tokenizer(config: TokenizerTrainingConfig) -> str:
    """Train and write the tokenizer; returns the written path."""
    config.validate()
    os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
    tmp = config.output + ".tmp"
    if config.type == "byte-level-bpe":
        _train_byte_level_bpe(config, tmp)
    else:
        _train_sentencepiece(config, tmp)
    os.replace(tmp, config.output)
    return config.output


def _sentences(config: TokenizerTrainingConfig) -> Iterator[str]:
    # SentencePiece trains on lines ("sentences"); documents are cut at newlines.
    for text in iter_training_texts(config):
        yield from (line for line in text.split("\n") if line.strip())


def _train_sentencepiece(config: TokenizerTrainingConfig, path: str) -> None:
    import sentencepiece

    model = io.BytesIO()
    try:
        _run_sentencepiece_trainer(sentencepiece, config, model)
    except RuntimeError as e:  # SentencePiece reports bad settings as RuntimeError
        raise ValueError(f"SentencePiece training on {list(config.inputs)} failed: {e}") from e
    with open(path, "wb") as f:
        f.write(model.getvalue())


def _run_sentencepiece_trainer(sentencepiece, config: TokenizerTrainingConfig, model) -> None:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_sentences(config), model_writer=model,
        model_type=config.type.split("-")[1], vocab_size=config.vocab_size,
        byte_fallback=config.byte_fallback, character_coverage=0.9995,
        # Identity normalization and kept whitespace: detokenize(tokenize(x)) == x.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, add_dummy_prefix=True,
        hard_vocab_limit=False, max_sentence_length=1 << 16, num_threads=config.num_threads,
        minloglevel=2, **SP_SPECIAL_IDS)


def _train_byte_level_bpe(config: TokenizerTrainingConfig, path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size,
                                  special_tokens=list(BYTE_LEVEL_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(iter_training_texts(config), trainer)
    tokenizer.save(path)
