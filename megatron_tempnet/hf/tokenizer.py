"""The tokenizer files of an export: a fast tokenizer (tokenizer.json + tokenizer_config.json)
that ``AutoTokenizer`` loads with no sentencepiece or protobuf, giving the ids of training.

Training encodes documents with megatron_tempnet/data/tokenizers.py: SentencePiece
``encode(text)`` or a tokenizers JSON's ``encode(text, add_special_tokens=False)``, with no BOS,
and appends the end-of-document token (eod) after each document. So the exported tokenizer:

* SentencePiece ``.model``: converted here to a tokenizers BPE / Unigram with SentencePiece's
  normaliser settings (dummy prefix, whitespace escaping, byte fallback), the way
  transformers' SpmConverter does; the original is kept as tokenizer.model (needed by nobody
  but SentencePiece users). Control pieces (<s>, </s>, ...) typed in the text stay text, as in
  SentencePiece (``split_special_tokens``).
* tokenizers ``.json``: copied, without a post-processor that would add special tokens.
* adds nothing: ``add_bos_token`` / ``add_eos_token`` false, no template post-processor;
  eos_token = the eod token; bos_token = the eod token too (what precedes a document in the
  training stream, as GPT-2's <|endoftext|>; lm-evaluation-harness puts it before a text);
  pad_token = the vocabulary's pad piece, else eod; unk_token = the model's.
* is checked at export: it must encode ``PROBE_TEXTS`` (and any texts given) to the training
  tokenizer's ids and decode them back, else the export fails.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_tempnet.data.tokenizers import (HUGGINGFACE, SENTENCEPIECE, Tokenizer,
                                              TokenizerError, load_tokenizer)

# Texts every exported tokenizer must encode exactly as training did.
PROBE_TEXTS = ("Hello world. The value of x is 42, not 7!", "  leading and trailing  ",
               "tabs\tand\nnew lines\n\nand  double  spaces", "digits 1234567890 3.14159",
               "Grüße aus Köln, naïve café, 日本語, emoji 🙂🚀, Ελληνικά", "x", " ",
               "def f(n):\n    return n * 2\n", "<s> </s> <pad> <unk> <|endoftext|>")

# SentencePiece ModelProto.SentencePiece.Type and TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
# Unigram: the score that keeps unknown / control / unused pieces out of the lattice
# (SentencePiece never matches them in text). tokenizers derives the unknown piece's score from
# the lowest score, but every segmentation of a text has the same unknown pieces (one per
# character no piece covers), so that score never changes which one wins.
EXCLUDED_SCORE = -1e6


def kind_of(tokenizer_file: str) -> str:
    return HUGGINGFACE if Path(tokenizer_file).suffix == ".json" else SENTENCEPIECE


def _sentencepiece_proto(path: str):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # it needs protobuf; only the export does
        raise TokenizerError(f"converting the SentencePiece model {path} to a fast tokenizer "
                             f"needs protobuf ({e}): pip install protobuf") from e
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def sentencepiece_to_fast(path: str):
    """A ``tokenizers.Tokenizer`` encoding like SentencePiece's ``encode(text)`` (BPE or
    Unigram models; transformers' SpmConverter.build_tokenizer_from_spm_proto, legacy)."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE as BPEModel
    from tokenizers.models import Unigram

    proto = _sentencepiece_proto(path)
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    user_defined = [p.piece for p in pieces if p.type == USER_DEFINED]
    if trainer.model_type == BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
        ranked = sorted((-score, i, token[:k], token[k:]) for token, (score, i) in normal.items()
                        for k in range(1, len(token))
                        if token[:k] in normal and token[k:] in normal)
        tok = Tokenizer(BPEModel(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked],
                                 unk_token=trainer.unk_piece, fuse_unk=True,
                                 byte_fallback=trainer.byte_fallback, dropout=None,
                                 ignore_merges=bool(user_defined)))
    elif trainer.model_type == UNIGRAM:
        excluded = (UNKNOWN, CONTROL, UNUSED)
        vocab = [(p.piece, EXCLUDED_SCORE if p.type in excluded else p.score) for p in pieces]
        tok = Tokenizer(Unigram(vocab, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback))
    else:
        raise TokenizerError(f"{path}: SentencePiece model type {trainer.model_type} (word or "
                             "char) cannot be exported as a fast tokenizer; use BPE or unigram")

    norm = []  # SentencePiece's order
    if spec.precompiled_charsmap:
        norm.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # only spaces count
        norm += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                 normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "▁"))
    if spec.add_dummy_prefix:  # Metaspace adds none before a leading "▁"; SentencePiece does
        norm.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    tok.normalizer = normalizers.Sequence(norm)
    pre = []
    if spec.add_dummy_prefix:
        pre.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                            split=False))
    if user_defined:  # SentencePiece emits them whole and never merges them
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if pre:
        tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    dec = [decoders.Replace("▁", " ")]
    if trainer.byte_fallback:
        dec.append(decoders.ByteFallback())
    if spec.add_dummy_prefix:
        dec += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif trainer.byte_fallback:
        dec.append(decoders.Fuse())
    tok.decoder = decoders.Sequence(dec)
    return tok


# post-processors that add special tokens (training encodes with add_special_tokens=False)
ADDING_POST_PROCESSORS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def tokenizers_json_without_specials(path: str):
    """The tokenizers JSON file with any post-processor that adds special tokens removed."""
    from tokenizers import Tokenizer

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    post = data.get("post_processor")
    if post and post.get("type") in ADDING_POST_PROCESSORS:
        data["post_processor"] = None
    elif post and post.get("type") == "Sequence":
        kept = [p for p in post["processors"] if p.get("type") not in ADDING_POST_PROCESSORS]
        post["processors"] = kept
        data["post_processor"] = post if kept else None
    return Tokenizer.from_str(json.dumps(data))


def special_tokens(tok: Tokenizer, fast) -> dict:
    """{bos,eos,pad,unk}_token strings and their ids (see the module doc)."""
    eod = fast.id_to_token(tok.eod)
    pad = fast.id_to_token(tok.pad_id) if tok.pad_id is not None else eod
    unk = None
    if kind_of(tok.path) == SENTENCEPIECE:
        unk = fast.id_to_token(tok._sp.unk_id())
    else:
        model = json.loads(fast.to_str()).get("model", {})
        unk = model.get("unk_token") if isinstance(model.get("unk_token"), str) else None
    tokens = {"bos_token": eod, "eos_token": eod, "pad_token": pad, "unk_token": unk}
    return {k: v for k, v in tokens.items() if v is not None}


def export_tokenizer(tokenizer_file: str, out: Path, model_max_length: int,
                     probe_texts=()) -> dict:
    """Write the fast tokenizer files (and a SentencePiece model's .model as tokenizer.model)
    into ``out``; returns the special token ids for the model config: bos_token_id,
    eos_token_id, pad_token_id."""
    from transformers import PreTrainedTokenizerFast

    kind = kind_of(tokenizer_file)
    tok = load_tokenizer(kind, tokenizer_file)
    if kind == SENTENCEPIECE:
        fast = sentencepiece_to_fast(tokenizer_file)
        shutil.copyfile(tokenizer_file, out / "tokenizer.model")
    else:
        fast = tokenizers_json_without_specials(tokenizer_file)
    specials = special_tokens(tok, fast)
    wrapper = PreTrainedTokenizerFast(
        tokenizer_object=fast, model_max_length=model_max_length,
        clean_up_tokenization_spaces=False, add_bos_token=False, add_eos_token=False,
        # SentencePiece reads "</s>" typed in a text as text; tokenizers as the special token
        split_special_tokens=kind == SENTENCEPIECE, **specials)
    wrapper.save_pretrained(out)
    # the class name every transformers version knows (5.x: TokenizersBackend), nothing added
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False,
                  add_eos_token=False)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    check_exported_tokenizer(out, tok, list(PROBE_TEXTS) + list(probe_texts))
    ids = {f"{name}_id": fast.token_to_id(specials[name])
           for name in ("bos_token", "eos_token", "pad_token")}
    return ids


def check_exported_tokenizer(out: Path, tok: Tokenizer, texts) -> None:
    """AutoTokenizer on ``out`` gives the training tokenizer's ids for each text, and its
    vocabulary size; raise TokenizerError naming the first text that differs."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out)
    if not hf.is_fast or len(hf) != tok.vocab_size:
        raise TokenizerError(f"exported tokenizer in {out}: fast {hf.is_fast}, {len(hf)} tokens; "
                             f"training's {tok.path} has {tok.vocab_size}")
    for text in texts:
        ours, theirs = tok.tokenize(text), hf(text, verbose=False)["input_ids"]
        if ours != theirs:
            raise TokenizerError(f"exported tokenizer in {out} encodes {text!r} as {theirs[:24]}"
                                 f", training's {tok.path} as {ours[:24]}: please report this")
        unknown = hf.unk_token_id is not None and hf.unk_token_id in ours
        # (an unknown piece decodes as " ⁇ " in SentencePiece, as "<unk>" here)
        if hf.decode(theirs) != tok.detokenize(ours) and not unknown:
            raise TokenizerError(f"exported tokenizer in {out} decodes {text!r} as "
                                 f"{hf.decode(theirs)!r}, training's as {tok.detokenize(ours)!r}")
