"""How every command ends: one line for a bad input, the documented exit codes, and a small
exit-status file that launchers read instead of parsing logs.

Bad input (a wrong flag or config value, corrupt or foreign data, a checkpoint that does not fit
the run, a full disk) raises :class:`~megatron_tempnet.config.ConfigError` (or a subclass) or an
``OSError`` such as ENOSPC. :func:`run_command` turns it into ONE line on standard error,
``error: <problem>: <fix>``, printed once per job (by rank 0; an error only one rank can see,
``ConfigError(..., rank_local=True)``, by that rank with its rank), and exit code
:data:`EXIT_CODE_BAD_INPUT`. Nothing already written is touched on the way out.

Exit codes of ``megatron_tempnet.train`` (torchrun reports any non-zero code of a worker as 1,
so the code and the reason are also written to ``<--save>/exit_status.json``, atomically):

    0  done                    3  preempted (SIGTERM / SIGUSR1), checkpoint saved: requeue
    2  bad input, see the line 4  --exit-duration-in-mins reached, checkpoint saved: requeue
                               5  diverged (non-finite, loss spike, collapsed to ln V): do not
                                  requeue; the last good checkpoint stays current
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from megatron_tempnet.config import ConfigError
from megatron_tempnet.files import write_json_atomic

EXIT_CODE_BAD_INPUT = 2
EXIT_STATUS_FILE = "exit_status.json"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class EarlySignals:
    """A SIGTERM / SIGUSR1 handler for the seconds before RunControl exists (imports, parsing):
    it records the signal instead of dying with 143; RunControl takes the record over
    (``run_control.RunControl.__enter__``) and stops the run once that is safe."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: int | None = None

    def __call__(self, signum, frame) -> None:
        self.received = signum

    @classmethod
    def install(cls) -> "EarlySignals":
        import signal

        handler = cls()
        for name in cls.SIGNALS:
            signal.signal(getattr(signal, name), handler)
        return handler


def process_rank() -> int:
    """This process's global rank: torch.distributed's when initialised, else the launcher's."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def error_line(exc: BaseException) -> str | None:
    """The one line a bad input ends with, or None when ``exc`` is a bug (keep its traceback)."""
    if isinstance(exc, ConfigError):
        return f"error: {exc}"
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        where = f" while writing {exc.filename}" if exc.filename else ""
        return (f"error: no space left on the device{where} ({os.strerror(exc.errno)}): free "
                "space or write to another directory; the checkpoints already written are "
                "unchanged")
    return None


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT error behind ``exc`` (libraries wrap it: torch's serializer reports
    "unexpected pos ..."), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def report(exc: BaseException) -> int | None:
    """Print the one line for ``exc`` (once per job) and return EXIT_CODE_BAD_INPUT, or None
    when ``exc`` is not a bad input."""
    line = error_line(exc)
    if line is None:
        return None
    rank = process_rank()
    if getattr(exc, "rank_local", False):
        line = f"[rank {rank}] {line}"
    if rank == 0 or getattr(exc, "rank_local", False):
        print(line, file=sys.stderr, flush=True)
    return EXIT_CODE_BAD_INPUT


def run_command(main, argv=None, status_dir=None) -> int:
    """``main(argv)`` -> its exit code; a bad input -> one line and EXIT_CODE_BAD_INPUT.
    ``status_dir()`` (called after the failure) names where exit_status.json goes, or None."""
    try:
        return main(argv)
    except Exception as exc:  # noqa: BLE001 - anything that is not a bad input re-raises
        code = report(exc)
        if code is None:
            full = disk_full_cause(exc)
            if full is None:
                raise
            code = report(full)
        directory = status_dir() if status_dir is not None else None
        if directory is not None:
            write_exit_status(directory, code, "bad input", error_line(exc)
                              or error_line(disk_full_cause(exc)))
        return code


def write_exit_status(directory, code: int, reason: str, message: str,
                      iteration: int | None = None) -> Path | None:
    """``directory/exit_status.json``: {exit_code, reason, message, iteration, time, host, pid,
    slurm_job_id}, written atomically (temp file + rename) by rank 0 (or by a rank-local
    error's rank). Returns the path (None: not written: no directory, or a full disk)."""
    if directory is None:
        return None
    path = Path(directory) / EXIT_STATUS_FILE
    record = {"exit_code": code, "reason": reason, "message": message, "iteration": iteration,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
              "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
    except OSError:
        return None
    return path


def read_exit_status(directory) -> dict | None:
    path = Path(directory) / EXIT_STATUS_FILE
    return json.loads(path.read_text()) if path.exists() else None
