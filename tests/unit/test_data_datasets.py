"""megatron-core GPTDataset/BlendedDataset building and the resumable micro-batch iterator."""
import os
import numpy as np
import pytest
import torch

from megatron_tempnet.config import ConfigError
from megatron_tempnet.data.config import DataConfig
from megatron_tempnet.data.datasets import (build_datasets, build_micro_batch_iterator,
                                            num_samples, parse_data_path)
from megatron_tempnet.data.indexed import CorruptDatasetError, IndexedDatasetWriter
from torchrun import run_torchrun


@pytest.fixture(scope="session")
def two_datasets(data_dir, tokenizers):
    """Two datasets whose tokens tell them apart: ids in [10, 300) and in [300, 600)."""
    rng = np.random.default_rng(0)
    eod = tokenizers["sentencepiece"].eod
    prefixes = []
    for name, low in (("low", 10), ("high", 300)):
        prefix = str(data_dir / name)
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            for _ in range(300):
                doc = rng.integers(low, low + 290, size=int(rng.integers(5, 60)))
                writer.add_document(np.append(doc, eod))
            writer.finalize()
        prefixes.append(prefix)
    return prefixes


MBS, GBS = 2, 8


def data_config(tmp_path, data_path, **overrides) -> DataConfig:
    return DataConfig(data_path=data_path, split="90,8,2",
                      data_cache_path=str(tmp_path / "cache"), **overrides)


def build(config: DataConfig, tokenizer, seq_length=32, train_iters=40):
    """Megatron-LM's sample counts for train_iters, eval every 20 iterations for 2 batches."""
    return build_datasets(config, tokenizer, seq_length, seed=7,
                          **dict(zip(("train_samples", "valid_samples", "test_samples"),
                                     num_samples(train_iters, GBS, 2, 20))))


def iterator(dataset, dp_rank=0, dp_size=1, **kwargs):
    return build_micro_batch_iterator(dataset, MBS, GBS, dp_rank, dp_size, **kwargs)


def test_parse_data_path():
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path("0.3 a 0.7 b") == (["a", "b"], [0.3, 0.7])
    assert parse_data_path(["0.3", "a", "0.7 b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ConfigError, match="either only prefixes or 'weight prefix' pairs"):
        parse_data_path(["0.3", "a", "b"])
    with pytest.raises(ConfigError, match="weights must be positive"):
        parse_data_path(["0", "a", "1", "b"])
    with pytest.raises(ConfigError, match="--data-path is empty"):
        parse_data_path([])


def test_num_samples_as_megatron():
    assert num_samples(40, 8, eval_iters=2, eval_interval=20) == [320, 3 * 2 * 8, 16]
    assert num_samples(40, 8) == [320, 0, 0]


def test_single_dataset_batches(tmp_path, sp_dataset, tokenizers):
    train, valid, test = build(data_config(tmp_path, [sp_dataset]), tokenizers["sentencepiece"])
    assert len(train) >= 320 and len(valid) >= 48 and len(test) >= 16
    batch = next(iterator(train))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    for key, dtype in (("tokens", torch.int64), ("labels", torch.int64),
                       ("loss_mask", torch.float32), ("position_ids", torch.int64)):
        assert batch[key].shape == (2, 32) and batch[key].dtype == dtype
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["position_ids"][0], torch.arange(32))
    assert os.listdir(tmp_path / "cache"), "sample indices are cached"


def test_blending_weights_respected(tmp_path, two_datasets, tokenizers):
    cfg = data_config(tmp_path, ["0.3", two_datasets[0], "0.7", two_datasets[1]])
    train, valid, _ = build(cfg, tokenizers["sentencepiece"], seq_length=16, train_iters=100)
    for dataset in (train, valid):
        shares = np.bincount(dataset.dataset_index, minlength=2) / len(dataset)
        assert abs(shares[0] - 0.3) < 0.01 and abs(shares[1] - 0.7) < 0.01
    # The samples themselves come from the right corpora, in the right proportion.
    high = 0
    for i in range(len(train)):
        sample = train[i]
        tokens = sample["tokens"][sample["tokens"] != tokenizers["sentencepiece"].eod]
        from_high = bool((tokens >= 300).all())
        assert from_high or bool((tokens < 300).all())
        assert from_high == (int(sample["dataset_id"]) == 1)
        high += from_high
    assert abs(high / len(train) - 0.7) < 0.01


def test_iterator_resume_gives_the_same_next_batch(tmp_path, sp_dataset, tokenizers):
    cfg = data_config(tmp_path, [sp_dataset])
    train, _, _ = build(cfg, tokenizers["sentencepiece"])
    it = iterator(train, dp_rank=1, dp_size=2)
    for _ in range(3):
        next(it)
    state = it.state_dict()
    assert state == {"consumed_samples": 3 * 2 * 2}
    expected = [next(it) for _ in range(2)]

    rebuilt, _, _ = build(cfg, tokenizers["sentencepiece"])  # from the cache
    resumed = iterator(rebuilt, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    for batch in expected:
        got = next(resumed)
        assert all(torch.equal(got[k], batch[k]) for k in batch)

    # The two ranks read disjoint slices of each global micro-batch.
    rank0 = iterator(train, dp_rank=0, dp_size=2)
    rank0.load_state_dict(state)
    assert not torch.equal(next(rank0)["tokens"], expected[0]["tokens"])


def test_iterator_with_dataloader_workers(tmp_path, sp_dataset, tokenizers):
    train, _, _ = build(data_config(tmp_path, [sp_dataset]), tokenizers["sentencepiece"])
    plain = iterator(train, consumed_samples=6)
    workers = iterator(train, consumed_samples=6, num_workers=1)
    for _ in range(2):
        a, b = next(plain), next(workers)
        assert torch.equal(a["tokens"], b["tokens"])


def test_batch_size_and_rank_errors(tmp_path, sp_dataset, tokenizers):
    with pytest.raises(ConfigError, match="--global-batch-size 6 is not a multiple of"):
        build_micro_batch_iterator(None, 2, 6, 0, 2)
    with pytest.raises(ConfigError, match="rank 2 is outside"):
        build_micro_batch_iterator([], 2, 8, 2, 2)


def test_missing_or_corrupt_prefix(tmp_path, sp_dataset, tokenizers):
    tok = tokenizers["sentencepiece"]
    with pytest.raises(CorruptDatasetError, match="nothere.*missing"):
        build(data_config(tmp_path, [str(tmp_path / "nothere")]), tok)
    prefix = str(tmp_path / "corrupt")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_documents(np.arange(100), np.array([50, 50]))
        w.finalize()
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"XXXX")
    with pytest.raises(CorruptDatasetError, match="corrupt.idx: bad header"):
        build(data_config(tmp_path, [prefix]), tok)


def test_build_under_torch_distributed(tmp_path, two_datasets, tokenizers):
    """Two gloo ranks under torchrun: rank 0 builds the index caches, rank 1 loads them."""
    cfg = data_config(tmp_path, ["0.5", two_datasets[0], "0.5", two_datasets[1]])
    tok = tokenizers["sentencepiece"]
    torch.save({"cfg": cfg, "tokenizer": ("sentencepiece", tok.path), "seq_length": 32,
                "seed": 7, "samples": num_samples(40, GBS, 2, 20), "mbs": MBS, "gbs": GBS},
               tmp_path / "case.pt")
    ranks = run_torchrun("data_build_worker.py", tmp_path, str(tmp_path / "case.pt"))
    got = {r["rank"]: [r["train"], r["valid"], r["tokens"]] for r in ranks}

    train, valid, _ = build(cfg, tok)  # single process, from the same cache
    reference = [next(iterator(train, r, 2))["tokens"].tolist() for r in (0, 1)]
    for rank in (0, 1):
        assert got[rank] == [len(train), len(valid), reference[rank]]
