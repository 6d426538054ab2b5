"""Launch a worker script under `torchrun --nproc_per_node N` from pytest.

Workers are ordinary scripts (with an ``if __name__ == "__main__":`` guard: megatron-core's
checkpoint saver starts spawn-context processes). Each rank writes its results with
``save_rank_result(obj)`` into the directory named by $TEST_RESULT_DIR; the launcher returns the
per-rank objects, in rank order, for the test to compare against a single-process reference.
A launch costs ~10 s on CPU (torchrun start + importing megatron-core per process), so workers
batch several checks into one launch.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKERS = Path(__file__).parent / "workers"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str, tmp_path: Path, *args: str, nproc: int = 2, timeout: float = 300,
                 env: dict | None = None) -> list:
    """Run tests/workers/<script> on `nproc` local processes; return each rank's saved result."""
    out = Path(tmp_path) / f"results-{Path(script).stem}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(WORKERS / script), *args]
    full_env = dict(os.environ, TEST_RESULT_DIR=str(out), OMP_NUM_THREADS="1",
                    PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    full_env.update(env or {})
    try:
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout,
                              cwd=str(REPO))
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{script} timed out after {timeout}s\n{e.stdout}\n{e.stderr}")
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed (exit {proc.returncode})\n"
                             f"--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-12000:]}")
    results = []
    for rank in range(nproc):
        f = out / f"rank{rank}.pt"
        assert f.exists(), f"rank {rank} of {script} saved no result\n{proc.stdout[-4000:]}"
        results.append(torch.load(f, weights_only=False))
    return results


def save_rank_result(obj) -> None:
    """Called inside a worker: store this rank's result for the launching test."""
    rank = int(os.environ.get("RANK", "0"))
    torch.save(obj, Path(os.environ["TEST_RESULT_DIR"]) / f"rank{rank}.pt")
