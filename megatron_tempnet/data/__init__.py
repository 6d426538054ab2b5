"""Data pipeline: tokenizers, JSONL -> Megatron .bin/.idx preprocessing, dataset building.

Public API (see each module):

    tokenizers:  TokenizerConfig, build_tokenizer, load_tokenizer, Tokenizer.padded_vocab_size
    preprocess:  PreprocessConfig, preprocess
    indexed:     IndexedDatasetWriter, check_indexed_dataset, merge_datasets
    config:      DataConfig (the data section of a run: --data-path, --split, --tokenizer-*)
    datasets:    build_datasets, build_micro_batch_iterator, MicroBatchIterator, num_samples
    demo_corpus: write_demo_corpus

``datasets`` imports megatron-core (seconds of start-up), so it is loaded on first use only:
the preprocessing tools and their worker processes never pay for it.
"""
import importlib

from megatron_tempnet.data.config import DataConfig
from megatron_tempnet.data.indexed import (CorruptDatasetError, IndexedDatasetWriter,
                                           check_indexed_dataset, merge_datasets)
from megatron_tempnet.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from megatron_tempnet.data.tokenizers import (Tokenizer, TokenizerConfig, TokenizerError,
                                              build_tokenizer, load_tokenizer)

_LAZY = {name: "megatron_tempnet.data.datasets" for name in
         ("MicroBatchIterator", "build_datasets", "build_micro_batch_iterator",
          "parse_data_path", "num_samples")}
_LAZY["write_demo_corpus"] = "megatron_tempnet.data.demo_corpus"


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataConfig", "CorruptDatasetError", "IndexedDatasetWriter", "check_indexed_dataset",
           "merge_datasets", "PreprocessConfig", "PreprocessError", "preprocess", "Tokenizer",
           "TokenizerConfig", "TokenizerError", "build_tokenizer", "load_tokenizer", *_LAZY]
