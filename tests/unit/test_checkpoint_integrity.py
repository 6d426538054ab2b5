"""Checkpoint checksums (megatron_tempnet/training/integrity.py): the manifest round trip, each
kind of corruption detected and named, the rank split, and a 2-process gloo run where only one
rank's share is corrupt and both ranks raise the same error. File contents are fresh random
bytes per test (the ``seed`` fixture prints the seed; TEMPNET_TEST_SEED replays it)."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest

from megatron_tempnet.config import ConfigError
from megatron_tempnet.training import integrity
from megatron_tempnet.training.integrity import (MANIFEST, CorruptCheckpointError,
                                                 checkpoint_files, split_files, verify_manifest,
                                                 write_manifest)
from torchrun import run_torchrun

NAMES = ["__0_0.distcp", "__1_0.distcp", "common.pt", "metadata.json", "sub/__0_1.distcp",
         "sub/deeper/mp_rank_00_model_states.pt"]


@pytest.fixture
def rng(seed):
    return random.Random(seed)


def make_checkpoint(root, rng, names=NAMES, max_size=3 << 20):
    """A checkpoint directory of random files (some larger than a read chunk, one empty)."""
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        size = 0 if i == 2 else rng.randrange(1, max_size)
        (root / name).write_bytes(rng.randbytes(size))
    return root


@pytest.fixture
def ckpt(tmp_path, rng):
    path = make_checkpoint(tmp_path / "SAVE" / "iter_0000100", rng)
    write_manifest(path)
    return path


def corrupt_error(path) -> str:
    with pytest.raises(CorruptCheckpointError) as info:
        verify_manifest(path)
    assert isinstance(info.value, ConfigError) and not info.value.rank_local
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"checkpoint {path} is corrupt")
    assert message.endswith(f"{integrity.SKIP_FLAG} skips this check")
    return message


def big_file(path, rng):
    """A file of ``path`` with at least 8 KiB, chosen at random."""
    return rng.choice([n for n in NAMES if (path / n).stat().st_size >= 8192])


def test_round_trip_verifies(ckpt):
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["version"] == 1 and manifest["algorithm"] == integrity.ALGORITHM
    assert sorted(manifest["files"]) == sorted(NAMES) == checkpoint_files(ckpt)
    for name, entry in manifest["files"].items():
        assert entry["size"] == (ckpt / name).stat().st_size
    assert [p.name for p in ckpt.iterdir() if p.name.startswith(MANIFEST)] == [MANIFEST]
    assert verify_manifest(ckpt) == "verified"


def test_digests_match_reference_and_threads(tmp_path, rng):
    """Chunked hashing equals one-shot zlib / hashlib; the thread count changes nothing; the
    manifest's recorded algorithm is the one verification uses."""
    path = make_checkpoint(tmp_path / "ck", rng)
    one = write_manifest(path, threads=1)
    assert write_manifest(path, threads=3) == one
    for name, entry in one["files"].items():
        data = (path / name).read_bytes()
        assert entry["digest"] == f"{zlib.crc32(data):08x}"
    sha = write_manifest(path, algorithm="sha256")
    assert sha["files"]["common.pt"]["digest"] == hashlib.sha256(b"").hexdigest()
    assert verify_manifest(path) == "verified"
    name = big_file(path, rng)
    with open(path / name, "r+b") as f:
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    message = corrupt_error(path)
    assert f"{name}: checksum mismatch (recorded sha256 " in message


def test_zeroed_region_detected_and_named(ckpt, rng):
    name = big_file(ckpt, rng)
    data = bytearray((ckpt / name).read_bytes())
    start = rng.randrange(0, len(data) - 4096)
    assert any(data[start:start + 4096])
    data[start:start + 4096] = bytes(4096)
    (ckpt / name).write_bytes(data)
    message = corrupt_error(ckpt)
    assert f"(1 of {len(NAMES)} files bad): {name}: checksum mismatch (recorded crc32 " in message


def test_random_bytes_detected(ckpt, rng):
    name = big_file(ckpt, rng)
    size = (ckpt / name).stat().st_size
    with open(ckpt / name, "r+b") as f:
        f.seek(rng.randrange(0, size - 16))
        old = f.read(16)
        f.seek(-16, 1)
        new = rng.randbytes(16)
        f.write(new if new != old else bytes(b ^ 1 for b in old))
    assert f"{name}: checksum mismatch" in corrupt_error(ckpt)


def test_truncated_file_detected(ckpt, rng):
    name = big_file(ckpt, rng)
    size = (ckpt / name).stat().st_size
    with open(ckpt / name, "r+b") as f:
        f.truncate(size - 4096)
    message = corrupt_error(ckpt)
    assert f"{name}: size differs (recorded {size} bytes, now {size - 4096})" in message


def test_missing_file_detected_and_earlier_checkpoint_named(ckpt, rng):
    (ckpt.parent / "iter_0000050").mkdir()
    (ckpt.parent / "iter_0000200").mkdir()  # newer: not a fallback
    name = rng.choice(NAMES)
    (ckpt / name).unlink()
    message = corrupt_error(ckpt)
    assert f"{name}: missing: restore it from a copy, or load an earlier checkpoint " \
           f"(--load {ckpt.parent / 'iter_0000050'}); " in message


def test_many_bad_files_named_up_to_five(tmp_path, rng):
    names = [f"__{i}_0.distcp" for i in range(8)]
    path = make_checkpoint(tmp_path / "iter_0000010", rng, names, max_size=4096)
    write_manifest(path)
    for name in names:
        (path / name).unlink()
    message = corrupt_error(path)
    assert "(8 of 8 files bad)" in message and " and 3 more: restore it from a copy; " in message
    assert sum(f"{n}: missing" in message for n in names) == 5


@pytest.mark.parametrize("content", ["{not json", '{"version": 1}', "[1, 2]",
                                     '{"version": 1, "algorithm": "crc32", "files": '
                                     '{"a": {"size": "12", "digest": "00"}}}',
                                     '{"version": 1, "algorithm": "rot13", "files": {}}',
                                     '{"version": 7, "algorithm": "crc32", "files": {}}'])
def test_unreadable_manifest_raises(ckpt, content):
    (ckpt / MANIFEST).write_text(content)
    assert f"{MANIFEST}: " in corrupt_error(ckpt)


def test_skip_flag_exists():
    from megatron_tempnet.arguments import all_flags

    assert integrity.SKIP_FLAG in all_flags()


def test_no_manifest_status(tmp_path, rng):
    path = make_checkpoint(tmp_path / "iter_0000001", rng)
    assert verify_manifest(path) == "no manifest"
    with pytest.raises(CorruptCheckpointError, match="no such directory"):
        verify_manifest(tmp_path / "iter_0000002")


def test_checkpoint_files_excludes_manifest_and_temp(ckpt):
    (ckpt / f"{MANIFEST}.tmp1234").write_text("{}")
    (ckpt / "sub" / MANIFEST).write_text("{}")  # not the manifest: a file like any other
    (ckpt / "link.pt").symlink_to(ckpt / "common.pt")
    assert checkpoint_files(ckpt) == sorted(NAMES + [f"sub/{MANIFEST}"])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_split_deterministic_and_covers_once(world, rng):
    for sizes in ([rng.randrange(0, 1 << 30) for _ in range(rng.randrange(0, 40))],
                  [7] * 10, [0] * 3, [1 << 30] + [1] * 9):
        shares = split_files(sizes, world)
        assert split_files(list(sizes), world) == shares and len(shares) == world
        assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
        loads = [sum(sizes[i] for i in share) for share in shares]
        # greedy largest-first: no rank exceeds the least loaded by more than one file
        assert max(loads) - min(loads) <= max(sizes, default=0)


@pytest.mark.parallel
def test_two_ranks_split_hashing_and_raise_the_same_error(tmp_path, seed):
    path = tmp_path / "SAVE" / "iter_0000100"
    r0, r1 = run_torchrun("integrity_worker.py", tmp_path, str(path), str(seed), timeout=180)
    assert r0["manifest"] is not None and r1["manifest"] is None
    names = sorted(r0["manifest"]["files"])
    assert len(names) == 8 and checkpoint_files(path) == [n for n in names  # one deleted
                                                          if n != r0["missing_rank0_share"][0]]
    assert r0["hashed"] and r1["hashed"] and not set(r0["hashed"]) & set(r1["hashed"])
    assert sorted(r0["hashed"] + r1["hashed"]) == names
    assert r0["verified"] == r1["verified"] == "verified"
    for case, what in (("corrupt_rank1_share", "checksum mismatch"),
                       ("missing_rank0_share", "missing")):
        (victim, m0), (_, m1) = r0[case], r1[case]
        assert m0 == m1 and m0.startswith(f"raised: checkpoint {path} is corrupt (1 of ")
        assert f": {victim}: {what}" in m0
    assert r0["corrupt_rank1_share"][0] in r1["hashed"]
    assert r0["missing_rank0_share"][0] in r0["hashed"]


def test_bench_checkpoint_hash_smoke():
    """bench/bench_checkpoint_hash.py runs, prints both tables and deletes its files."""
    repo = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as where:
        out = subprocess.run([sys.executable, "bench/bench_checkpoint_hash.py", "--smoke",
                              "--threads", "1", "--algorithms", "crc32", "sha256", "--dir", where],
                             cwd=repo, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert not list(Path(where).iterdir())
    ops = [ln.split(" | ")[:2] for ln in out.stdout.splitlines() if ln.startswith("| ")]
    assert ["| write_manifest", "sha256"] in ops and ["| verify_manifest", "crc32"] in ops
    assert "Extrapolation, not a measurement" in out.stdout
