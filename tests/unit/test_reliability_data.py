"""Data integrity: corrupt indices, token ids beyond the vocabulary, stale sample-index caches,
unusable blend weights and empty data each end as one clear ConfigError, never as training on
garbage (or an IndexError / hang inside megatron-core)."""
import errno
import os
import re
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_tempnet.config import ConfigError
from megatron_tempnet.data import indexed
from megatron_tempnet.data.config import DataConfig
from megatron_tempnet.data.datasets import (build_datasets, build_micro_batch_iterator,
                                            cache_dir, parse_data_path)
from megatron_tempnet.data.indexed import (CorruptDatasetError, IndexedDatasetWriter,
                                           check_indexed_dataset, file_identity, stats_path,
                                           token_id_range)
from reliability import assert_one_error
from torchrun import REPO

FIX = "re-create it with tools/preprocess_data.py"


def write_dataset(prefix, docs, dtype=np.uint16) -> str:
    with IndexedDatasetWriter(str(prefix), dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
        writer.finalize()
    return str(prefix)


def random_docs(n, low, high, seed=0, eod=None):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(low, high, size=int(rng.integers(5, 40))) for _ in range(n)]
    return docs if eod is None else [np.append(d, eod) for d in docs]


def index_arrays(prefix):
    """(dtype code, lengths, pointers, documents) of an .idx, as writable copies."""
    raw = Path(prefix + ".idx").read_bytes()
    _, code, num_seq, num_doc = struct.unpack("<QBQQ", raw[9:indexed.HEADER_BYTES])
    at = indexed.HEADER_BYTES
    lengths = np.frombuffer(raw, np.int32, num_seq, at).copy()
    pointers = np.frombuffer(raw, np.int64, num_seq, at + 4 * num_seq).copy()
    documents = np.frombuffer(raw, np.int64, num_doc, at + 12 * num_seq).copy()
    return code, lengths, pointers, documents


def rewrite_index(prefix, code, lengths, pointers, documents):
    with open(prefix + ".idx", "wb") as f:
        f.write(indexed.INDEX_HEADER + struct.pack("<QBQQ", 1, code, len(lengths),
                                                   len(documents)))
        for array in (lengths.astype(np.int32), pointers.astype(np.int64),
                      documents.astype(np.int64)):
            f.write(array.tobytes())


def shuffle_lengths(prefix, seed=0):
    """Permute the sequence lengths (same sum, so the .bin size still matches)."""
    code, lengths, pointers, documents = index_arrays(prefix)
    rng = np.random.default_rng(seed)
    shuffled = lengths.copy()
    while np.array_equal(shuffled, lengths):
        shuffled = rng.permutation(lengths)
    rewrite_index(prefix, code, shuffled, pointers, documents)
    return int(np.argmax(np.cumsum(shuffled) != np.cumsum(lengths))) + 1


@pytest.fixture
def small(tmp_path):
    return write_dataset(tmp_path / "small", random_docs(50, 10, 300))


def data_config(tmp_path, data_path, split="90,8,2") -> DataConfig:
    return DataConfig(data_path=data_path, split=split, data_cache_path=str(tmp_path / "cache"))


def build(tmp_path, data_path, tokenizer, seq_length=16, samples=(40, 8, 4), split="90,8,2"):
    return build_datasets(data_config(tmp_path, data_path, split), tokenizer, seq_length, seed=3,
                          train_samples=samples[0], valid_samples=samples[1],
                          test_samples=samples[2])


# 1. whole-index validation

def test_pointers_not_the_running_sum(small):
    code, lengths, pointers, documents = index_arrays(small)
    pointers[17] += 2
    rewrite_index(small, code, lengths, pointers, documents)
    with pytest.raises(CorruptDatasetError, match=rf"small\.idx: sequence 17 starts at byte "
                                                  rf"{pointers[17]} of the .bin, but .*{FIX}"):
        check_indexed_dataset(small)


def test_first_pointer_not_zero(small):
    code, lengths, pointers, documents = index_arrays(small)
    rewrite_index(small, code, lengths, pointers + 2, documents)
    with pytest.raises(CorruptDatasetError, match=r"sequence 0 starts at byte 2 .* at byte 0"):
        check_indexed_dataset(small)


def test_shuffled_lengths_disagree_with_pointers(small):
    first_bad = shuffle_lengths(small)
    with pytest.raises(CorruptDatasetError, match=rf"small\.idx: sequence {first_bad} starts "
                                                  rf".*offsets and lengths disagree.*{FIX}"):
        check_indexed_dataset(small)


def test_document_indices_not_monotone(small):
    code, lengths, pointers, documents = index_arrays(small)
    documents[10], documents[11] = documents[11], documents[10]
    rewrite_index(small, code, lengths, pointers, documents)
    with pytest.raises(CorruptDatasetError, match=rf"small\.idx: document boundary 11 is "
                                                  rf"sequence 10, before boundary 10 .*must not "
                                                  rf"decrease.*{FIX}"):
        check_indexed_dataset(small)


def test_document_indices_must_end_at_the_sequence_count(small):
    code, lengths, pointers, documents = index_arrays(small)
    documents[-1] -= 1
    rewrite_index(small, code, lengths, pointers, documents)
    with pytest.raises(CorruptDatasetError, match=r"run from 0 to 49, not from 0 to the "
                                                  r"sequence count 50"):
        check_indexed_dataset(small)


def test_negative_length(small):
    code, lengths, pointers, documents = index_arrays(small)
    lengths[3], lengths[4] = -1, lengths[4] + lengths[3] + 1  # same sum
    rewrite_index(small, code, lengths, pointers, documents)
    with pytest.raises(CorruptDatasetError, match=r"sequence 3 has length -1 \(lengths must "
                                                  r"be >= 0\)"):
        check_indexed_dataset(small)


def test_validation_across_chunks(small, monkeypatch):
    """The chunked checks carry the running offset over chunk boundaries."""
    monkeypatch.setattr(indexed, "CHUNK_ITEMS", 7)
    assert check_indexed_dataset(small).num_documents == 50
    code, lengths, pointers, documents = index_arrays(small)
    pointers[30] -= 2
    documents[22] = documents[21] - 1
    rewrite_index(small, code, lengths, pointers, documents)
    with pytest.raises(CorruptDatasetError, match="sequence 30 starts"):
        check_indexed_dataset(small)
    pointers[30] += 2
    rewrite_index(small, code, lengths, pointers, documents)
    with pytest.raises(CorruptDatasetError, match="document boundary 22 is"):
        check_indexed_dataset(small)


# 2. token ids against the tokenizer's vocabulary

def test_token_id_range_is_cached_on_the_files_identity(tmp_path, monkeypatch):
    prefix = write_dataset(tmp_path / "d", [[5, 9, 3], [2047, 0]])
    monkeypatch.setattr(indexed, "SCAN_CHUNK_BYTES", 4)  # two tokens a chunk
    assert token_id_range(prefix) == (0, 2047)
    assert Path(stats_path(prefix)).exists()
    scans = []
    real_scan = indexed._scan_token_range
    monkeypatch.setattr(indexed, "_scan_token_range", lambda *a: scans.append(a) or real_scan(*a))
    assert token_id_range(prefix) == (0, 2047) and not scans  # from the sidecar
    write_dataset(prefix, [[7, 8], [9]])  # rewritten: new identity
    assert token_id_range(prefix) == (7, 9) and len(scans) == 1
    Path(stats_path(prefix)).write_text("{not json")
    assert token_id_range(prefix) == (7, 9) and len(scans) == 2
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_token_id_range_without_a_writable_directory(tmp_path, monkeypatch):
    prefix = write_dataset(tmp_path / "d", [[1, 2, 3]], dtype=np.int32)

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "read-only", str(tmp_path))

    monkeypatch.setattr(indexed.tempfile, "mkstemp", read_only)
    assert token_id_range(prefix) == (1, 3)
    assert not Path(stats_path(prefix)).exists()


def test_ids_beyond_the_vocabulary_rejected_before_training(tmp_path, tokenizers):
    tok = tokenizers["sentencepiece"]  # vocabulary 800
    prefix = write_dataset(tmp_path / "foreign", random_docs(60, 10, 700) + [[5, 2047, 6]])
    expected = (rf"data prefix {re.escape(prefix)} holds token id 2047 >= the tokenizer's "
                rf"vocabulary size 800 \(--tokenizer-model {re.escape(tok.path)}\): the data "
                rf"was preprocessed with another tokenizer; pass that tokenizer, or preprocess "
                rf"the data again with this one$")
    with pytest.raises(ConfigError, match=expected):
        build(tmp_path, [prefix], tok)


def test_negative_ids_rejected(tmp_path, tokenizers):
    prefix = write_dataset(tmp_path / "neg", random_docs(60, 10, 700) + [[5, -3, 6]], np.int32)
    with pytest.raises(CorruptDatasetError,
                       match=rf"{re.escape(prefix)} holds token id -3 < 0 .*{FIX}"):
        build(tmp_path, [prefix], tokenizers["sentencepiece"])


def batches_of(rows):
    rows = torch.tensor(rows)
    return [{"tokens": r[:-1], "labels": r[1:], "loss_mask": torch.ones(len(r) - 1),
             "position_ids": torch.arange(len(r) - 1)} for r in rows]


def test_micro_batch_ids_checked_against_the_vocabulary():
    rows = [[1, 2, 3, 4]] * 8
    rows[5] = [1, 2, 3, 900]  # only in the labels
    rows[6] = [-1, 2, 3, 4]
    dataset = batches_of(rows)
    it = build_micro_batch_iterator(dataset, 2, 4, dp_rank=0, dp_size=2, vocab_size=800)
    next(it)  # samples 0..1
    rank1 = build_micro_batch_iterator(dataset, 2, 4, dp_rank=1, dp_size=2, vocab_size=800,
                                       consumed_samples=4)
    with pytest.raises(ConfigError, match=r"micro-batch of samples 6\.\.7 holds tokens id -1 "
                                          r"outside the tokenizer's vocabulary \[0, 800\)") as e:
        next(rank1)
    assert e.value.rank_local
    rank0 = build_micro_batch_iterator(dataset, 2, 4, dp_rank=0, dp_size=2, vocab_size=800,
                                       consumed_samples=4)
    with pytest.raises(ConfigError, match=r"samples 4\.\.5 holds labels id 900 .*preprocess it "
                                          r"again"):
        next(rank0)
    # Without vocab_size nothing is checked (as before).
    assert next(build_micro_batch_iterator(dataset, 2, 4, 1, 2, consumed_samples=4))


# 3. the sample-index cache follows the data

def test_cache_rebuilt_when_the_data_under_a_prefix_changes(tmp_path, tokenizers):
    tok = tokenizers["sentencepiece"]
    prefix = str(tmp_path / "data")
    write_dataset(prefix, random_docs(300, 10, 300, eod=tok.eod))
    old_cache = cache_dir(data_config(tmp_path, [prefix]), [prefix])
    build(tmp_path, [prefix], tok, samples=(40, 8, 0))
    assert os.listdir(old_cache)
    # Fewer documents, other ids: the old document/sample indices would point past the end.
    write_dataset(prefix, random_docs(40, 500, 600, seed=1, eod=tok.eod))
    assert cache_dir(data_config(tmp_path, [prefix]), [prefix]) != old_cache
    train, valid, _ = build(tmp_path, [prefix], tok, samples=(40, 8, 0))
    for dataset in (train, valid):
        for i in range(len(dataset)):
            tokens = dataset[i]["tokens"]
            assert bool(((tokens >= 500) | (tokens == tok.eod)).all())
    batches = build_micro_batch_iterator(train, 2, 4, 0, 2, vocab_size=tok.vocab_size)
    assert [next(batches)["tokens"].shape for _ in range(3)] == [(2, 16)] * 3


def test_cache_dir_keyed_on_identity(tmp_path, small):
    cfg = DataConfig(data_path=[small])
    first = cache_dir(cfg, [small])
    assert first.startswith(str(tmp_path / "index_cache" / "data-"))
    assert cache_dir(cfg, [small]) == first
    os.utime(small + ".bin", ns=(1, file_identity(small)["bin"][1] + 1000))
    assert cache_dir(cfg, [small]) != first


# 4. rough inputs: blend weights, empty data

@pytest.mark.parametrize("weights, named", [
    (["nan", "1"], "weight 'nan' of a is not usable"),
    (["1", "inf"], "weight 'inf' of b is not usable"),
    (["-0.5", "1"], "weight '-0.5' of a is not usable"),
    (["0", "0.0"], r"weights are all 0 \(0 0\.0\)"),
])
def test_unusable_blend_weights(weights, named):
    with pytest.raises(ConfigError, match=rf"--data-path {named}: weights must be positive "
                                          rf"finite numbers, e.g. '0.3 data/a 0.7 data/b'"):
        parse_data_path([weights[0], "a", weights[1], "b"])


def test_dataset_without_documents(tmp_path, tokenizers):
    prefix = write_dataset(tmp_path / "empty", [])
    assert check_indexed_dataset(prefix).num_documents == 0  # a valid (mergeable) index
    expected = (rf"data prefix {re.escape(prefix)} holds no tokens \(0 documents in "
                rf"{re.escape(prefix)}\.idx\): preprocess a non-empty corpus")
    with pytest.raises(ConfigError, match=expected):
        build(tmp_path, [prefix], tokenizers["sentencepiece"])


def test_split_too_short_for_one_sample(tmp_path, tokenizers):
    prefix = write_dataset(tmp_path / "short", [[1, 2, 3, 4, 5]] * 4)  # 20 tokens
    expected = (rf"data prefix {re.escape(prefix)}: its train split \(--split '1,0,0': "
                rf"sequences 0\.\.4 of 4\) holds 20 tokens, but one sample of --seq-length 32 "
                rf"needs 33: give the dataset more documents, lower --seq-length")
    with pytest.raises(ConfigError, match=expected):
        build(tmp_path, [prefix], tokenizers["sentencepiece"], seq_length=32, samples=(8, 0, 0),
              split="1,0,0")


def test_empty_split(tmp_path, tokenizers):
    """Three documents: the 8% valid split gets none (megatron-core would loop forever)."""
    prefix = write_dataset(tmp_path / "three", random_docs(3, 10, 300))
    with pytest.raises(ConfigError, match=r"its valid split .*sequences 3\.\.3 of 3\) holds 0 "
                                          r"tokens.*or change --split \(weight 0 drops a split\)"):
        build(tmp_path, [prefix], tokenizers["sentencepiece"], seq_length=4)


# 5. end to end: one line, exit code 2, no traceback

def train_command(data_prefix, tokenizer_model):
    return [sys.executable, "-m", "megatron_tempnet.train", "--model", "tiny-gpt",
            "--data-path", data_prefix, "--tokenizer-type", "sentencepiece",
            "--tokenizer-model", tokenizer_model, "--split", "99,1,0", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
            "--eval-iters", "0", "--log-interval", "1"]


def run_train(cmd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def bad_data_runs(tmp_path_factory, tiny_corpus):
    """Both end-to-end cases' inputs, then their commands started together (each a fresh Python
    process, mostly imports on one core; CI has 2): {case: (data prefix, detail, future)}."""
    d = tmp_path_factory.mktemp("bad_data")
    foreign = write_dataset(d / "foreign", random_docs(200, 3, 400) + [[7, 1999, 8]])
    shuffled = str(d / "copy")
    for suffix in (".bin", ".idx"):
        Path(shuffled + suffix).write_bytes(Path(tiny_corpus.data_prefix + suffix).read_bytes())
    first_bad = shuffle_lengths(shuffled)
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {case: (prefix, detail, pool.submit(run_train, train_command(
                   prefix, tiny_corpus.tokenizer_model)))
               for case, prefix, detail in (("foreign ids", foreign, None),
                                            ("shuffled lengths", shuffled, first_bad))}


def test_train_rejects_ids_beyond_the_vocabulary(bad_data_runs, tiny_corpus):
    prefix, _, run = bad_data_runs["foreign ids"]
    assert_one_error(run.result(),
                     f"error: data prefix {prefix} holds token id 1999 >= the tokenizer's "
                     f"vocabulary size 500 (--tokenizer-model {tiny_corpus.tokenizer_model})")


def test_train_rejects_an_index_with_shuffled_lengths(bad_data_runs):
    prefix, first_bad, run = bad_data_runs["shuffled lengths"]
    assert_one_error(run.result(), f"error: {prefix}.idx: sequence {first_bad} starts at byte")
