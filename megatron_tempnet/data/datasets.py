"""Training datasets (megatron-core GPTDataset + BlendedMegatronDatasetBuilder) and a
resumable micro-batch iterator for one data-parallel rank.

Works in a single process and under torch.distributed: with a process group, megatron-core
builds the cached sample indices on rank 0 first and the other ranks load them after a barrier.

Before megatron-core sees the data, every dataset is checked (:func:`check_data`): a valid index,
not empty, every split long enough for one sample, and no token id outside the tokenizer's
vocabulary (scanned once, cached beside the data). The sample-index cache lives in a directory
named after the data files' identity, so data rewritten under the same prefix is never read
through indices built for the old data.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_tempnet.config import ConfigError
from megatron_tempnet.data.config import DataConfig
from megatron_tempnet.data.indexed import (CorruptDatasetError, IndexInfo,
                                           check_indexed_dataset, file_identity, token_id_range)
from megatron_tempnet.data.tokenizers import Tokenizer

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
TOKEN_KEYS = ("tokens", "labels")
SPLIT_NAMES = ("train", "valid", "test")
DEFAULT_CACHE_DIRNAME = "index_cache"
# Blends sample each dataset slightly beyond its share (megatron-core's default margin).
MID_LEVEL_DATASET_SURPLUS = 0.005


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], Optional[list[float]]]:
    """Megatron's --data-path: prefixes, optionally each preceded by its weight."""
    words = (data_path.split() if isinstance(data_path, str)
             else [w for item in data_path for w in str(item).split()])
    if not words:
        raise ConfigError("--data-path is empty: give dataset prefixes, e.g. "
                          "'data/corpus_text_document' or '0.3 data/a 0.7 data/b'")
    weights = [_as_float(w) for w in words[0::2]]
    if len(words) % 2 == 0 and all(w is not None for w in weights):
        _check_weights(words[0::2], weights, words[1::2])
        return words[1::2], weights
    if any(_as_float(w) is not None for w in words):
        raise ConfigError(f"--data-path {' '.join(words)!r}: give either only prefixes or "
                          f"'weight prefix' pairs")
    return words, None


def _check_weights(words: list[str], weights: list[float], prefixes: list[str]) -> None:
    fix = ("weights must be positive finite numbers, e.g. '0.3 data/a 0.7 data/b'; leave a "
           "dataset out of --data-path rather than giving it weight 0")
    if all(w == 0 for w in weights):
        raise ConfigError(f"--data-path weights are all 0 ({' '.join(words)}): {fix}")
    for word, weight, prefix in zip(words, weights, prefixes):
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"--data-path weight {word!r} of {prefix} is not usable: {fix}")


def _as_float(word: str) -> Optional[float]:
    try:
        return float(word)
    except ValueError:
        return None


def num_samples(train_iters: int, global_batch_size: int, eval_iters: int = 0,
                eval_interval: int | None = None) -> list[int]:
    """Samples per split as Megatron-LM computes them: [train, valid, test]."""
    evaluations = train_iters // eval_interval + 1 if eval_interval else 1
    return [train_iters * global_batch_size, evaluations * eval_iters * global_batch_size,
            eval_iters * global_batch_size]


def cache_dir(config: DataConfig, prefixes: Sequence[str]) -> str:
    """megatron-core's sample-index cache: ``data-<key>`` under --data-cache-path (default
    ``<first prefix dir>/index_cache``), the key hashing every .bin/.idx's identity (size,
    mtime_ns, inode), so changed data gets a fresh cache instead of stale indices."""
    base = config.data_cache_path or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])),
                                                  DEFAULT_CACHE_DIRNAME)
    identity = json.dumps([file_identity(p) for p in prefixes]).encode()
    return os.path.join(base, "data-" + hashlib.md5(identity, usedforsecurity=False)
                        .hexdigest()[:16])


def check_data(config: DataConfig, tokenizer: Tokenizer) -> dict[str, IndexInfo]:
    """Check every --data-path dataset before megatron-core opens it (it would hang on an empty
    split, fail on a bare assert, or train on ids beyond the embedding): a valid .bin/.idx, at
    least one token, and token ids in [0, tokenizer.vocab_size). Returns each prefix's index."""
    prefixes, _ = parse_data_path(config.data_path)
    infos = {prefix: check_indexed_dataset(prefix) for prefix in prefixes}
    for prefix, info in infos.items():
        if info.num_documents == 0 or info.num_tokens == 0:
            raise ConfigError(f"data prefix {prefix} holds no tokens ({info.num_documents} "
                              f"documents in {info.path}): preprocess a non-empty corpus into "
                              f"it with tools/preprocess_data.py, or leave it out of --data-path")
    ranges = _rank_zero_first(lambda: [token_id_range(p, i) for p, i in infos.items()])
    vocab = tokenizer.vocab_size
    for (prefix, info), (low, high) in zip(infos.items(), ranges):
        if high >= vocab:
            raise ConfigError(f"data prefix {prefix} holds token id {high} >= the tokenizer's "
                              f"vocabulary size {vocab} (--tokenizer-model "
                              f"{getattr(tokenizer, 'path', None)}): the data was preprocessed "
                              f"with another tokenizer; pass that tokenizer, or preprocess the "
                              f"data again with this one")
        if low < 0:
            raise CorruptDatasetError(f"data prefix {prefix} holds token id {low} < 0 (its "
                                      f"{info.dtype} .bin is corrupt or not token ids): "
                                      f"re-create it with tools/preprocess_data.py")
    return infos


def _rank_zero_first(fn):
    """``fn()`` on rank 0, then (after a barrier) on the others: the token-id scans run once
    and the other ranks read the cache rank 0 wrote."""
    if not dist.is_initialized():
        return fn()
    if dist.get_rank() == 0:
        try:
            return fn()
        finally:
            dist.barrier()
    dist.barrier()
    return fn()


def check_split_sizes(infos: dict[str, IndexInfo], gpt_config: GPTDatasetConfig,
                      sizes: Sequence[int]) -> None:
    """Every split megatron-core will build holds the tokens of one sample (``seq_length`` + 1)
    in each dataset, or at least one token where no samples are asked for (an empty split makes
    megatron-core's epoch count loop forever)."""
    seq_length, spec = gpt_config.sequence_length, gpt_config.split
    for prefix, info in infos.items():
        for name, bounds, size in zip(SPLIT_NAMES, gpt_config.split_matrix, sizes):
            if bounds is None:
                continue
            begin, end = (int(round(b * info.num_sequences)) for b in bounds)
            tokens = int(info.sequence_lengths[begin:end].sum(dtype=np.int64))
            needed = seq_length + gpt_config.add_extra_token_to_sequence if size else 1
            if tokens < needed:
                need = (f"one sample of --seq-length {seq_length} needs {needed}" if size else
                        "megatron-core needs at least 1 even for a split no sample is asked of")
                raise ConfigError(
                    f"data prefix {prefix}: its {name} split (--split {spec!r}: sequences "
                    f"{begin}..{end} of {info.num_sequences}) holds {tokens} tokens, but {need}: "
                    f"give the dataset more documents, lower --seq-length, or change --split "
                    f"(weight 0 drops a split)")


def gpt_dataset_config(config: DataConfig, tokenizer: Tokenizer, seq_length: int, seed: int
                       ) -> GPTDatasetConfig:
    """megatron-core's config for checked data (see :func:`check_data`)."""
    prefixes, weights = parse_data_path(config.data_path)
    try:
        return GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights),
            split=config.split, path_to_cache=cache_dir(config, prefixes), tokenizer=tokenizer,
            reset_position_ids=config.reset_position_ids,
            reset_attention_mask=config.reset_attention_mask,
            eod_mask_loss=config.eod_mask_loss, create_attention_mask=False,
            mmap_bin_files=config.mmap_bin_files,
            mid_level_dataset_surplus=MID_LEVEL_DATASET_SURPLUS)
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"--split {config.split!r} / --data-path {config.data_path!r}: "
                          f"invalid ({e}); a split looks like '949,50,1'") from e


@contextlib.contextmanager
def _process_group_for_builder():
    """megatron-core's BlendedDataset calls torch.distributed.get_rank() when it writes its
    cache even without torch.distributed; a one-process gloo group stands in meanwhile."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_datasets(config: DataConfig, tokenizer: Tokenizer, seq_length: int, seed: int,
                   train_samples: int, valid_samples: int = 0, test_samples: int = 0
                   ) -> tuple[Optional[GPTDataset], Optional[GPTDataset], Optional[GPTDataset]]:
    """Train, valid and test datasets of ``seq_length``-token samples (None for a split with
    no documents). Call on every rank; see num_samples() for Megatron-LM's sample counts."""
    infos = check_data(config, tokenizer)
    gpt_config = gpt_dataset_config(config, tokenizer, seq_length, seed)
    sizes = [train_samples, valid_samples, test_samples]
    check_split_sizes(infos, gpt_config, sizes)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, gpt_config)
    with _process_group_for_builder():
        train, valid, test = builder.build()
    return train, valid, test


def collate_gpt_batch(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack GPTDataset samples into the usual Megatron GPT batch of [b, s] tensors."""
    return {key: torch.stack([s[key] for s in samples]) for key in BATCH_KEYS}


class _RankBatchSampler:
    """Megatron's pretraining sampler: from ``consumed``, each step takes the next
    ``micro_batch_size * dp_size`` indices of the dataset and gives this rank its slice."""

    def __init__(self, length: int, consumed: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int):
        self.length, self.consumed = length, consumed
        self.mbs, self.rank, self.step = micro_batch_size, dp_rank, micro_batch_size * dp_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(self.consumed, self.length - self.step + 1, self.step):
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))

    def __len__(self) -> int:
        return max(0, (self.length - self.consumed) // self.step)


class MicroBatchIterator:
    """Micro-batches for one data-parallel rank; its position is ``consumed_samples`` (global,
    all ranks together), saved by ``state_dict()`` and restored by ``load_state_dict()``.
    ``vocab_size``: every batch's tokens and labels are checked to lie in [0, vocab_size)."""

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0, num_workers: int = 0,
                 vocab_size: Optional[int] = None):
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers = num_workers
        self.consumed_samples = consumed_samples
        self.vocab_size = vocab_size
        self._batches: Optional[Iterator] = None

    def _loader(self) -> torch.utils.data.DataLoader:
        sampler = _RankBatchSampler(len(self.dataset), self.consumed_samples,
                                    self.micro_batch_size, self.dp_rank, self.dp_size)
        # A private generator: creating the loader's iterator draws a base seed, which must not
        # come from torch's global generator (that would make a resumed run, whose iterator is
        # created later, draw different dropout masks than an uninterrupted one).
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler,
                                           num_workers=self.num_workers,
                                           collate_fn=collate_gpt_batch,
                                           generator=torch.Generator())

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self._loader())
        batch = next(self._batches)
        if self.vocab_size is not None:
            self._check_token_ids(batch)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    def _check_token_ids(self, batch: dict[str, torch.Tensor]) -> None:
        """One min/max per int tensor; an id outside the vocabulary would index past the
        embedding (a CUDA assert far from the cause) or train on garbage."""
        for key in TOKEN_KEYS:
            low, high = (int(v) for v in torch.aminmax(batch[key]))
            if low < 0 or high >= self.vocab_size:
                first = self.consumed_samples + self.dp_rank * self.micro_batch_size
                raise ConfigError(
                    f"micro-batch of samples {first}..{first + self.micro_batch_size - 1} holds "
                    f"{key} id {high if high >= self.vocab_size else low} outside the "
                    f"tokenizer's vocabulary [0, {self.vocab_size}): the data does not match "
                    f"--tokenizer-model; pass the tokenizer it was preprocessed with, or "
                    f"preprocess it again with tools/preprocess_data.py", rank_local=True)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
        self._batches = None


def build_micro_batch_iterator(dataset, micro_batch_size: int, global_batch_size: int,
                               dp_rank: int, dp_size: int, consumed_samples: int = 0,
                               num_workers: int = 0, vocab_size: Optional[int] = None
                               ) -> Optional[MicroBatchIterator]:
    """The iterator of data-parallel rank ``dp_rank`` of ``dp_size``; None for no dataset.
    ``vocab_size`` (the tokenizer's): check each batch's ids against it."""
    step = micro_batch_size * dp_size
    if global_batch_size % step:
        raise ConfigError(f"--global-batch-size {global_batch_size} is not a multiple of "
                          f"--micro-batch-size {micro_batch_size} x data-parallel size "
                          f"{dp_size}: choose a multiple of {step}")
    if dataset is None:
        return None
    return MicroBatchIterator(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples,
                              num_workers, vocab_size)
