"""Checkpoint checksum benchmark: seconds and GB/s of ``write_manifest`` per algorithm and of
``verify_manifest`` (megatron_tempnet/training/integrity.py), one process, against a plain read
of the same files (a ``cat``-like loop of 1 MiB reads on as many threads), for the choice of
``integrity.ALGORITHM`` and the cost of checksums per save / load.

The synthetic checkpoint: --files files of --size-gib GiB in all, random bytes, in a fresh
temporary directory under --dir (deleted afterwards). The files were just written, so they are
in the page cache when memory allows: this measures the hashing, not the storage (a checkpoint
read back from a network file system reads at that file system's speed, whichever is lower).
Each row is the best of --repeats after one untimed read of everything. A second table
extrapolates the per-rank time of a checkpoint of --extrapolate-gb GB (default 84: a 7B model
with fp32 Adam state, 12 bytes per parameter) split over --ranks ranks at the measured rate.

    python bench/bench_checkpoint_hash.py                                  # 2 GiB, 8 files
    python bench/bench_checkpoint_hash.py --size-gib 4 --threads 1 2 --algorithms crc32 sha256
    python bench/bench_checkpoint_hash.py --smoke                          # seconds, tiny
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_tempnet.training import integrity  # noqa: E402

ALGORITHMS = ["crc32", "sha1", "sha256", "md5", "blake2b"]
BLOCK = 16 << 20  # bytes of fresh random data per write of the synthetic files


def make_checkpoint(root: Path, size: int, files: int) -> int:
    """``files`` random files of ``size`` bytes together under root (one in a subfolder, as
    dist_checkpointing may do); returns the bytes written."""
    per_file, total = size // files, 0
    for i in range(files):
        path = root / (f"sub/__{i}_0.distcp" if i == files - 1 else f"__{i}_0.distcp")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = per_file
            while left:
                n = min(BLOCK, left)
                f.write(os.urandom(n))
                left -= n
        total += per_file
    return total


def read_all(root: Path, threads: int) -> None:
    """The plain read the hashing is compared with: every file, 1 MiB reads, no hashing."""
    def read(name):
        buf = bytearray(integrity.CHUNK)
        with open(root / name, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, integrity.checkpoint_files(root)))


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(root: Path, nbytes: int, args) -> list[dict]:
    rows = []

    def row(op, algorithm, threads, fn):
        s = best_time(fn, args.repeats)
        rows.append({"op": op, "algorithm": algorithm, "threads": threads, "s": s,
                     "gbps": nbytes / s / 1e9})
        print(f"  done: {op} {algorithm} threads={threads}: {s:.2f} s", file=sys.stderr,
              flush=True)

    read_all(root, max(args.threads))  # warm the page cache
    for threads in args.threads:
        row("read (cat-like)", "-", threads, lambda: read_all(root, threads))
        for algorithm in args.algorithms:
            row("write_manifest", algorithm, threads,
                lambda: integrity.write_manifest(root, algorithm=algorithm, threads=threads))
        integrity.write_manifest(root, threads=threads)  # the default algorithm, then verify it
        row("verify_manifest", integrity.ALGORITHM, threads,
            lambda: integrity.verify_manifest(root, threads=threads))
    return rows


def table(rows: list[dict], nbytes: int) -> str:
    lines = ["| operation | algorithm | threads | GiB | seconds | GB/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['algorithm']} | {r['threads']} | "
                     f"{nbytes / 2**30:.3g} | {r['s']:.3f} | {r['gbps']:.2f} |")
    return "\n".join(lines)


def extrapolation(rows: list[dict], gb: float, ranks: list[int]) -> str:
    """Per-rank seconds of the default algorithm's write_manifest / verify_manifest on a
    checkpoint of ``gb`` GB split evenly over ``ranks``, at the best measured rate."""
    best = {op: max((r for r in rows if r["op"] == op and r["algorithm"] == integrity.ALGORITHM),
                    key=lambda r: r["gbps"]) for op in ("write_manifest", "verify_manifest")}
    rate = {op: r["gbps"] for op, r in best.items()}
    lines = [f"Extrapolation, not a measurement: {gb:g} GB at {rate['write_manifest']:.2f} GB/s "
             f"(write) / {rate['verify_manifest']:.2f} GB/s (verify) per rank "
             f"({integrity.ALGORITHM}, {best['write_manifest']['threads']} / "
             f"{best['verify_manifest']['threads']} threads, page cache)", "",
             "| ranks | GB per rank | write_manifest s/rank | verify_manifest s/rank |",
             "| --- | --- | --- | --- |"]
    for n in ranks:
        per = gb / n
        lines.append(f"| {n} | {per:.3g} | {per / rate['write_manifest']:.2f} | "
                     f"{per / rate['verify_manifest']:.2f} |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=2.0, help="total size of the checkpoint")
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="hashing threads of the one process (integrity's thread pool)")
    p.add_argument("--algorithms", nargs="+", default=ALGORITHMS,
                   help="crc32 or any hashlib name")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the files are written")
    p.add_argument("--extrapolate-gb", type=float, default=84.0)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--smoke", action="store_true", help="8 MiB in 4 files, 1 repeat")
    args = p.parse_args(argv)
    if args.smoke:
        args.size_gib, args.files, args.repeats = 8 / 1024, 4, 1
    for algorithm in args.algorithms:
        if not integrity._known(algorithm):
            p.error(f"--algorithms {algorithm}: not crc32 nor a hashlib algorithm")
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_hash_", dir=args.dir))
    try:
        nbytes = make_checkpoint(root, int(args.size_gib * 2**30), args.files)
        rows = measure(root, nbytes, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"# Checkpoint checksums: {nbytes / 2**30:.3g} GiB in {args.files} files, one "
          f"process, best of {args.repeats}; {cpu_name()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, zlib "
          f"{zlib.ZLIB_RUNTIME_VERSION}, {datetime.date.today()}\n")
    print(table(rows, nbytes))
    print()
    print(extrapolation(rows, args.extrapolate_gb, args.ranks))
    return rows


if __name__ == "__main__":
    main()
