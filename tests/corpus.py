"""A tiny training corpus for end-to-end tests: demo documents -> SentencePiece BPE (vocab 500)
-> .bin/.idx, built in-process (no subprocess). ``tests/conftest.py`` builds it once per session
(fixture ``tiny_corpus``); torchrun workers receive its paths as arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_tempnet.data.demo_corpus import write_demo_corpus
from megatron_tempnet.data.preprocess import PreprocessConfig, preprocess
from megatron_tempnet.data.tokenizer_training import TokenizerTrainingConfig, train_tokenizer
from megatron_tempnet.data.tokenizers import TokenizerConfig


@dataclass(frozen=True)
class TinyCorpus:
    data_prefix: str  # for --data-path
    tokenizer_model: str  # for --tokenizer-model (SentencePiece)

    def data_flags(self) -> list[str]:
        return ["--data-path", self.data_prefix, "--tokenizer-type", "sentencepiece",
                "--tokenizer-model", self.tokenizer_model, "--split", "99,1,0"]


def build_tiny_corpus(out: Path, max_bytes: int = 400_000, vocab_size: int = 500) -> TinyCorpus:
    out.mkdir(parents=True, exist_ok=True)
    corpus, spm = out / "corpus.jsonl", out / "tok.model"
    write_demo_corpus(str(corpus), max_bytes=max_bytes)
    train_tokenizer(TokenizerTrainingConfig([str(corpus)], str(spm), "sentencepiece-bpe",
                                            vocab_size=vocab_size))
    summary = preprocess(PreprocessConfig([str(corpus)], str(out / "demo"),
                                          TokenizerConfig("sentencepiece", str(spm)),
                                          append_eod=True))
    return TinyCorpus(summary.outputs[0], str(spm))
