"""Training datasets (megatron-core GPTDataset + BlendedMegatronDatasetBuilder) and a
resumable micro-batch iterator for one data-parallel rank.

Works in a single process and under torch.distributed: with a process group, megatron-core
builds the cached sample indices on rank 0 first and the other ranks load them after a barrier.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_tempnet.config import ConfigError
from megatron_tempnet.data.config import DataConfig
from megatron_tempnet.data.indexed import check_indexed_dataset
from megatron_tempnet.data.tokenizers import Tokenizer

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
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
        if any(w <= 0 for w in weights):
            raise ConfigError(f"--data-path weights must be positive, got {weights}")
        return words[1::2], weights
    if any(_as_float(w) is not None for w in words):
        raise ConfigError(f"--data-path {' '.join(words)!r}: give either only prefixes or "
                          f"'weight prefix' pairs")
    return words, None


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
    if config.data_cache_path:
        return config.data_cache_path
    return os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), DEFAULT_CACHE_DIRNAME)


def gpt_dataset_config(config: DataConfig, tokenizer: Tokenizer, seq_length: int, seed: int
                       ) -> GPTDatasetConfig:
    prefixes, weights = parse_data_path(config.data_path)
    for prefix in prefixes:
        check_indexed_dataset(prefix)
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
    gpt_config = gpt_dataset_config(config, tokenizer, seq_length, seed)
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, test_samples], lambda: True, gpt_config)
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
    all ranks together), saved by ``state_dict()`` and restored by ``load_state_dict()``."""

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0, num_workers: int = 0):
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers = num_workers
        self.consumed_samples = consumed_samples
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
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
        self._batches = None


def build_micro_batch_iterator(dataset, micro_batch_size: int, global_batch_size: int,
                               dp_rank: int, dp_size: int, consumed_samples: int = 0,
                               num_workers: int = 0) -> Optional[MicroBatchIterator]:
    """The iterator of data-parallel rank ``dp_rank`` of ``dp_size``; None for no dataset."""
    step = micro_batch_size * dp_size
    if global_batch_size % step:
        raise ConfigError(f"--global-batch-size {global_batch_size} is not a multiple of "
                          f"--micro-batch-size {micro_batch_size} x data-parallel size "
                          f"{dp_size}: choose a multiple of {step}")
    if dataset is None:
        return None
    return MicroBatchIterator(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples,
                              num_workers)
