"""Who may write into a ``--save`` directory, and what a save may delete.

A run *lineage* is one training run and every job that resumes it (a requeued SLURM job, a
resume by hand): a new id when a run starts from scratch or with ``--finetune``, inherited from
the checkpoint when it resumes. The directory records it in three places:

    SAVE/.lock              held (fcntl.lockf, a POSIX lock) by rank 0 of the run writing here,
                            for the whole run; its text says who (host, pid, SLURM job, start
                            time). A killed process releases it (the kernel drops the lock with
                            the process); on NFS the lock manager holds it across hosts.
    SAVE/lineage.json       the lineage that owns the directory (written when a run claims it)
    SAVE/iter_*/writer.json the lineage that wrote that checkpoint (written by rank 0 before
                            any tensor, so an unfinished directory is attributable too)

The rules (:func:`claim`, :func:`may_replace`, :func:`prunable`):
- a run starting fresh (or with --finetune) refuses a directory that holds a complete
  checkpoint: continue that run with ``--load SAVE``, or save elsewhere; with no complete
  checkpoint there yet (the first save never finished) it adopts the directory's lineage;
- a resumed run refuses a directory owned by another lineage;
- a save replaces an existing ``iter_*`` directory only if this lineage wrote it; keep-last
  deletes only complete checkpoints of this lineage, never the current one. Directories of
  other lineages and of unknown origin (no writer.json: e.g. copied in by hand) are never
  deleted.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path

from megatron_tempnet.config import ConfigError
from megatron_tempnet.files import write_json_atomic

LOCK_FILE = ".lock"
LINEAGE_FILE = "lineage.json"
WRITER_FILE = "writer.json"

_HELD: dict[str, object] = {}  # resolved --save path -> the open lock file of this process


def new_lineage() -> str:
    return uuid.uuid4().hex[:16]


def _who() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}): it records which run owns this "
                          "directory; restore it or save into another directory") from None


def acquire_lock(root: Path) -> None:
    """Hold ``root/.lock`` for this process (idempotent); another live holder -> ConfigError
    naming it."""
    key = str(root.resolve())
    if key in _HELD:
        return
    root.mkdir(parents=True, exist_ok=True)
    f = open(root / LOCK_FILE, "a+")
    try:  # a POSIX record lock: per process (forked data workers do not inherit it), and
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # NFS locks it across hosts
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK, EOPNOTSUPP, ...: no locks
            f.close()
            raise ConfigError(f"--save {root}: cannot lock {root / LOCK_FILE} "
                              f"({e.strerror or e}): its filesystem has no POSIX record locks; "
                              "save to one that has (Lustre: mount with flock), or add "
                              "--no-save-lock (then nothing stops a second run writing "
                              "there)") from None
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(f"--save {root} is in use by another run ({holder}; lock "
                          f"{root / LOCK_FILE}): wait for it to finish, or save into another "
                          "directory") from None
    f.seek(0)
    f.truncate()
    w = _who()
    f.write(f"pid {w['pid']} on {w['host']}, SLURM job {w['slurm_job_id']}, since {w['time']}\n")
    f.flush()
    _HELD[key] = f


def release_lock(root) -> None:
    f = _HELD.pop(str(Path(root).resolve()), None)
    if f is not None:
        f.close()  # closing the file drops the lock; the file stays (no unlink race). Nothing
        # else in this process may open and close .lock: that would drop the POSIX lock too


def writer_lineage(path: Path) -> str | None:
    """The lineage that wrote checkpoint directory ``path`` (None: unknown)."""
    record = read_json(path / WRITER_FILE)
    return record.get("lineage") if record else None


def write_writer(path: Path, lineage: str, iteration: int) -> None:
    write_json_atomic(path / WRITER_FILE, {"lineage": lineage, "iteration": iteration,
                                           **_who()})


def claim(root: Path, lineage: str | None, complete: list[int], resuming: bool,
          load: str | None) -> str:
    """Decide (on rank 0, holding the lock) which lineage writes into ``root``; raise when the
    directory belongs to another run. ``lineage``: the resumed checkpoint's (None: a fresh run
    or a checkpoint older than lineages); ``complete``: the iterations of complete checkpoints
    in ``root``. Returns the lineage and records it in ``root/lineage.json``."""
    owner = (read_json(root / LINEAGE_FILE) or {}).get("lineage")
    found = ", ".join(f"iter_{i:07d}" for i in complete[-3:])
    if resuming:
        lineage = lineage or owner or new_lineage()
        if owner is not None and owner != lineage:
            raise ConfigError(f"--save {root} belongs to another run (lineage {owner}; it holds "
                              f"{found or 'no complete checkpoint'}) than the checkpoint "
                              f"--load {load} continues (lineage {lineage}): save into a new "
                              "directory, or --load that directory to continue its run")
        if owner is None and complete and not _inside(load, root):
            raise ConfigError(f"--save {root} already holds checkpoints ({found}) that this "
                              f"run did not write (it resumes --load {load}): save into a new "
                              "directory")
    elif complete:
        raise ConfigError(f"--save {root} already holds checkpoints of another run ({found}): "
                          f"this run starts fresh{' (--finetune)' if load else ''} and would "
                          f"overwrite them; continue that run with --load {root}, or save into "
                          "a new directory")
    else:
        lineage = owner or new_lineage()  # nothing complete yet: a restart of the same run
    if owner != lineage:
        write_json_atomic(root / LINEAGE_FILE, {"lineage": lineage, **_who()})
    return lineage


def continues(root: Path, load: str | None) -> bool:
    """Whether a run with ``--save root --load load`` is root's own run before any check: root
    holds no checkpoint directory yet, or ``load`` lies inside it (the requeue pattern)."""
    return not any(root.glob("iter_*")) or _inside(load, root)


def _inside(load: str | None, root: Path) -> bool:
    if load is None:
        return False
    path, root = Path(load).resolve(), root.resolve()
    return path == root or root in path.parents


def may_replace(path: Path, lineage: str) -> None:
    """An existing ``iter_*`` directory a save is about to replace: allowed only if this
    lineage wrote it (or it is empty); else ConfigError naming it."""
    if not path.exists() or not any(path.iterdir()):
        return
    writer = writer_lineage(path)
    if writer != lineage:
        whose = f"lineage {writer}" if writer else "unknown origin, no writer.json"
        raise ConfigError(f"--save: {path} exists and was written by another run ({whose}); "
                          "refusing to delete it: move it away, or save into another "
                          "directory")


def prunable(paths: dict[int, Path], latest: int, lineage: str) -> list[int]:
    """Of ``paths`` (iteration -> complete checkpoint directory beyond keep-last), the
    iterations this lineage wrote that are not the current one."""
    return [i for i, path in paths.items() if i != latest and writer_lineage(path) == lineage]
