"""The layout of a ``--save`` directory: its ``iter_*`` checkpoint directories, the marker
``latest_checkpointed_iteration.txt`` naming the current one, which format a directory holds
(megatron-core's torch_dist or DeepSpeed's), keep-last pruning, and which checkpoint ``--load``
names. No torch: plain files (the full layout: ``training/checkpointing.py``)."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from megatron_tempnet.config import ConfigError
from megatron_tempnet.files import write_text_atomic
from megatron_tempnet.training import save_dir

LATEST_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 1  # the common state's checkpoint_version
# Checkpoint format -> (the file a complete checkpoint directory has, what it is, how to load
# it). torch_dist: megatron-core writes metadata.json last; deepspeed: DeepSpeed's model states
# of tensor-parallel rank 0 (its completeness is the marker's job, written after every rank).
CHECKPOINT_FORMATS = {
    "torch_dist": ("metadata.json", "a megatron-core dist_checkpointing checkpoint",
                   "load it without --deepspeed"),
    "deepspeed": ("mp_rank_00_model_states.pt", "a DeepSpeed checkpoint",
                  "load it with --deepspeed --deepspeed_config <the ZeRO config of its run> "
                  "(training; evaluation and tools/convert_checkpoint_to_hf.py read it as it "
                  "is, tools/convert_deepspeed_checkpoint.py makes a megatron-core checkpoint "
                  "of it)"),
}


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_latest(root: str | os.PathLike) -> int | None:
    """The iteration in ``root/latest_checkpointed_iteration.txt`` (None: no marker)."""
    marker = Path(root) / LATEST_FILE
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{marker} holds {text!r}, not an iteration number")
    return int(text)


def write_latest(root: str | os.PathLike, iteration: int) -> None:
    """Point the marker at ``iteration`` atomically: a crash leaves the old or the new one."""
    write_text_atomic(Path(root) / LATEST_FILE, f"{iteration}\n")


def saved_iterations(root: str | os.PathLike) -> list[int]:
    return sorted(int(m.group(1)) for p in Path(root).glob("iter_*")
                  if p.is_dir() and (m := re.fullmatch(r"iter_(\d+)", p.name)))


def complete_iterations(root: str | os.PathLike) -> list[int]:
    """The iterations of ``root``'s complete checkpoint directories (any format)."""
    return [i for i in saved_iterations(root) if checkpoint_format(iteration_dir(root, i))]


def prune_checkpoints(root: str | os.PathLike, keep_last: int, lineage: str) -> list[int]:
    """Delete all but the newest ``keep_last`` complete checkpoints up to the current one:
    only those ``lineage`` wrote (save_dir.py), never the current one, never newer
    (unfinished) directories. Returns the deleted iterations."""
    latest = read_latest(root)
    if latest is None:
        return []
    older = [i for i in complete_iterations(root) if i <= latest]
    doomed = save_dir.prunable({i: iteration_dir(root, i) for i in older[:-keep_last]},
                               latest, lineage)
    for iteration in doomed:
        shutil.rmtree(iteration_dir(root, iteration), ignore_errors=True)
    return doomed


def describe_dir(path: Path, limit: int = 12) -> str:
    entries = sorted(path.iterdir())
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:limit]]
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(names) + more if names else "nothing (empty directory)"


def checkpoint_format(path: Path) -> str | None:
    """The format of the checkpoint directory ``path`` (a key of CHECKPOINT_FORMATS), or None."""
    for fmt, (complete, _, _) in CHECKPOINT_FORMATS.items():
        if (path / complete).exists():
            return fmt
    return None


def check_new_save_dir(save: str) -> None:
    """A converter's ``save`` must be new, or a directory holding no checkpoint (nothing is
    overwritten)."""
    root = Path(save)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--save {save} is a file, not a directory: give another --save")
    if root.is_dir() and ((root / LATEST_FILE).exists() or saved_iterations(root)):
        raise ConfigError(f"--save {save} already holds a checkpoint; refusing to overwrite it: "
                          "give another --save (or delete that directory)")


def load_format(load: str) -> str:
    """The format of the checkpoint ``--load`` names (the marker's iteration directory, or the
    directory itself); "torch_dist" when it holds none yet (the load names the problem)."""
    root = Path(load)
    latest = read_latest(root) if root.is_dir() else None
    path = iteration_dir(root, latest) if latest is not None else root
    return (checkpoint_format(path) if path.is_dir() else None) or "torch_dist"


def _require_format(path: Path, fmt: str, load: str) -> None:
    found = checkpoint_format(path)
    if found is not None and found != fmt:
        _, what, how = CHECKPOINT_FORMATS[found]
        raise ConfigError(f"--load {load}: {path} is {what}, not "
                          f"{CHECKPOINT_FORMATS[fmt][1]}: {how}")


def resolve_load_dir(load: str, save: str | None, fmt: str = "torch_dist") -> Path | None:
    """The checkpoint directory ``--load`` names, or None to start from scratch.

    ``load/latest_checkpointed_iteration.txt`` -> that iteration's directory; a directory that
    is itself one checkpoint (has ``fmt``'s file, e.g. metadata.json) -> it. With no checkpoint
    yet, a run whose --load is its own --save starts from scratch (the first job of a requeued
    series); otherwise the error says what the directory holds. A checkpoint of another format
    (megatron-core's vs DeepSpeed's) is an error naming both.
    """
    root = Path(load)
    complete = CHECKPOINT_FORMATS[fmt][0]
    latest = read_latest(root) if root.is_dir() else None
    if latest is not None:
        path = iteration_dir(root, latest)
        _require_format(path, fmt, load)
        if not (path / complete).exists():
            raise ConfigError(f"--load {load}: {LATEST_FILE} says {latest} but {path} is "
                              f"missing or incomplete; {root} holds {describe_dir(root)}")
        return path
    _require_format(root, fmt, load)
    if (root / complete).exists():
        return root
    if save is not None and Path(save).resolve() == root.resolve():
        found = saved_iterations(root) if root.is_dir() else []
        complete = [i for i in found if checkpoint_format(iteration_dir(root, i)) == fmt]
        if complete:
            newest = iteration_dir(root, complete[-1])
            raise ConfigError(
                f"--load {load}: {LATEST_FILE} is missing but {root} holds checkpoints "
                f"({', '.join(f'iter_{i:07d}' for i in complete[-3:])}): refusing to start "
                f"from scratch over them; resume from the newest with --load {newest} (or "
                f"restore the marker: echo {complete[-1]} > {root / LATEST_FILE})")
        return None
    if not root.exists():
        raise ConfigError(f"--load {load}: no such directory; give the directory a run wrote "
                          "with --save")
    raise ConfigError(f"--load {load}: no {LATEST_FILE} in it (it holds {describe_dir(root)}); "
                      f"give the directory a run passed to --save, or one iter_* directory "
                      "inside it; a directory whose first save never finished has no marker")
