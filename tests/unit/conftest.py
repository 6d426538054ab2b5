"""Session fixtures of the data tests: a small corpus and two tiny tokenizers trained on it
(SentencePiece BPE with byte fallback, byte-level BPE), once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_helpers import UNICODE_DOCS, write_jsonl
from megatron_tempnet.data.demo_corpus import iter_demo_documents
from megatron_tempnet.data.preprocess import PreprocessConfig, preprocess
from megatron_tempnet.data.tokenizer_training import TokenizerTrainingConfig, train_tokenizer
from megatron_tempnet.data.tokenizers import TokenizerConfig, build_tokenizer


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    docs = []
    for doc in iter_demo_documents():
        docs.append(doc)
        if len(docs) == 400:
            break
    return docs + UNICODE_DOCS


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def corpus_file(data_dir, corpus_docs) -> Path:
    return write_jsonl(data_dir / "corpus.jsonl", corpus_docs)


@pytest.fixture(scope="session")
def tokenizer_configs(data_dir, corpus_file) -> dict[str, TokenizerConfig]:
    sp = train_tokenizer(TokenizerTrainingConfig([str(corpus_file)], str(data_dir / "sp.model"),
                                                 "sentencepiece-bpe", vocab_size=800))
    bpe = train_tokenizer(TokenizerTrainingConfig([str(corpus_file)], str(data_dir / "bpe.json"),
                                                  "byte-level-bpe", vocab_size=600))
    return {"sentencepiece": TokenizerConfig("sentencepiece", sp),
            "huggingface": TokenizerConfig("huggingface", bpe)}


@pytest.fixture(scope="session")
def tokenizers(tokenizer_configs):
    return {kind: build_tokenizer(cfg) for kind, cfg in tokenizer_configs.items()}


@pytest.fixture(scope="session")
def sp_dataset(data_dir, corpus_file, tokenizer_configs) -> str:
    """The corpus preprocessed with the SentencePiece tokenizer, eod appended."""
    summary = preprocess(PreprocessConfig([str(corpus_file)], str(data_dir / "corpus"),
                                          tokenizer_configs["sentencepiece"], append_eod=True))
    return summary.outputs[0]
