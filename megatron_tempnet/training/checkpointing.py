"""Checkpoints (megatron-core ``dist_checkpointing``), resume, and when a run stops.

Layout of ``--save DIR`` (Megatron-LM's, torch_dist format)::

    DIR/latest_checkpointed_iteration.txt   "100": the current checkpoint; written by rank 0,
                                            atomically (temp file + rename), only after every
                                            rank finished writing iter_0000100/
    DIR/.lock, DIR/lineage.json             the run writing here, the run owning it
                                            (training/save_dir.py: who may write and delete)
    DIR/exit_status.json                    how the last run ended (cli.py), atomically
    DIR/iter_0000100/                       one dist_checkpointing directory:
        writer.json                         the run that wrote it (first, before any tensor)
        metadata.json, common.pt, *.distcp  written by megatron-core (metadata.json last)
        checksums.json                      every file's size and CRC-32 (integrity.py),
                                            written before the marker; verified on load
      model       sharded tensors of every model chunk (TempNet included): load under another
                  TP/PP layout
      optimizer   megatron-core's optimizer.sharded_state_dict(model) (reshardable: TP/PP/DP)
      rng_state   one ShardedObject per rank (python, numpy, torch CPU, torch CUDA, megatron's
                  RNG-tracker states), global shape (PP, TP, DP)
      common      iteration, consumed_samples, scheduler state, checkpoint_version, and the run's
                  config (model / tempnet / train / parallel sections) for the shape check

A resume must keep the checkpoint's TempNet settings, data order and lr schedule (or say which
schedule wins: ``--override-opt-param-scheduler`` / ``--use-checkpoint-opt-param-scheduler``);
every refusal is one ConfigError line naming both values and the fix.

Resume (``--load``) composes those state dicts: a run continued from a
checkpoint is bitwise identical to an uninterrupted one (saving moves no RNG; the data iterator
draws from no global generator). ``--load`` takes the --save directory (its marker names the
checkpoint) or one iter_* directory; with no checkpoint yet, --load == --save starts from scratch
(the first job of a requeued series). Under another TP/PP/DP layout model and optimizer reshard,
the RNG states are not restored (a warning says so). ``--finetune`` loads model weights only
(TempNet keeps its init when the checkpoint has none) and starts at iteration 0.
megatron-core 0.16.1 with torch's Adam (no apex / TE) needs two small workarounds on load:
:func:`ensure_optimizer_state` and :func:`load_optimizer_state`.

Under ``--deepspeed`` the same marker names ``iter_*`` directories that hold DeepSpeed's own
checkpoint (``training/deepspeed.py``, ``DeepSpeedCheckpointer``); :class:`Checkpointer` holds
what both formats share: when to save, the save protocol (stale directory cleared, every rank
writes, barrier, marker, keep-last), the shape check, which states a resume restores, and the
scheduler / RNG / data position it hands back. Each format refuses the other's checkpoints by
name (:data:`CHECKPOINT_FORMATS`).

When a run stops (:class:`RunControl`, checked once per iteration with ONE small all-reduce so
that every rank agrees):
- SIGTERM / SIGUSR1 (SLURM's preemption / ``--signal``): save, exit ``EXIT_CODE_PREEMPTED``;
- ``--exit-duration-in-mins`` elapsed: save, exit ``EXIT_CODE_TIME_LIMIT``;
- non-finite loss or gradient norm, a loss spike (``--loss-spike-factor``), or a collapse to
  uniform predictions (``--collapse-patience`` iterations at ln V after learning): raise
  :class:`TrainingDiverged` without saving (the last good checkpoint stays current);
  ``train.py`` exits ``EXIT_CODE_DIVERGED``.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_tempnet.cli import EarlySignals, disk_full_cause
from megatron_tempnet.config import ConfigError
from megatron_tempnet.files import write_text_atomic
from megatron_tempnet.tempnet.config import TEMPNET_LOSS_MODES
from megatron_tempnet.training import integrity, save_dir

EXIT_CODE_PREEMPTED = 3  # SIGTERM / SIGUSR1: checkpoint saved, requeue the job
EXIT_CODE_TIME_LIMIT = 4  # --exit-duration-in-mins: checkpoint saved, requeue the job
EXIT_CODE_DIVERGED = 5  # non-finite loss / grad norm or loss spike: nothing saved, do not requeue

LATEST_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Model fields that decide tensor shapes (compared before any tensor is loaded).
SHAPE_FIELDS = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size", "tie_embeddings")
# megatron-core's distributed-optimizer checkpoint format, reshardable across TP, PP and DP
# (0.16.1's default "fully_sharded_model_space" fails: "flattened_range is not supported").
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "chained_optim_avoid_prefix": True}
# Checkpoint format -> (the file a complete checkpoint directory has, what it is, how to load
# it). torch_dist: megatron-core writes metadata.json last; deepspeed: DeepSpeed's model states
# of tensor-parallel rank 0 (its completeness is the marker's job, written after every rank).
CHECKPOINT_FORMATS = {
    "torch_dist": ("metadata.json", "a megatron-core dist_checkpointing checkpoint",
                   "load it without --deepspeed"),
    "deepspeed": ("mp_rank_00_model_states.pt", "a DeepSpeed checkpoint",
                  "load it with --deepspeed --deepspeed_config <the ZeRO config of its run> "
                  "(training only: evaluation and the Hugging Face export read megatron-core "
                  "checkpoints)"),
}


@dataclass
class CheckpointConfig:
    """Checkpointing and run control; flags keep Megatron-LM's names (--save, --load, ...).

    save / load:    checkpoint directories (often the same one: a requeued job resumes from its
                    own checkpoints; with no checkpoint there yet it starts from scratch).
    save_interval:  save every N iterations (None: only at the end and when stopped early).
    keep_last:      keep the newest k checkpoints (None: keep all).
    exit_duration_in_mins: save and exit (EXIT_CODE_TIME_LIMIT) once this much time has passed.
    exit_signal_handler: SIGTERM / SIGUSR1 save and exit (EXIT_CODE_PREEMPTED).
    finetune:       load model weights only (TempNet may be absent: it keeps its init); reset
                    iteration, optimizer, scheduler and data position.
    no_load_optim / no_load_rng: resume without the optimizer and scheduler state (a fresh
                    optimizer; the lr schedule continues at the loaded iteration) / the RNG states.
    loss_spike_factor: stop (like a NaN) when the loss exceeds factor x its running mean
                    (None: off).
    collapse_patience: stop (like a NaN) when the lm loss, after having dropped below ln V,
                    sits at ln V (uniform predictions) for this many iterations (0: off).
    override_opt_param_scheduler / use_checkpoint_opt_param_scheduler: Megatron-LM's pair for
                    a resume whose lr / weight-decay schedule flags differ from the
                    checkpoint's: this run's values (Adam moments kept), or the checkpoint's;
                    with neither, the difference is an error naming both.
    no_checkpoint_checksums: neither record checksums at save nor verify them at load.
    """

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    keep_last: int | None = None
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = True
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    loss_spike_factor: float | None = None
    collapse_patience: int = 20
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    no_checkpoint_checksums: bool = False

    def validate(self) -> "CheckpointConfig":
        for name in ("save_interval", "keep_last"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: must be an integer "
                                  ">= 1 (or left out)")
        if self.save_interval is not None and not self.save:
            raise ConfigError(f"--save-interval {self.save_interval} needs --save DIR "
                              "(where to write the checkpoints)")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ConfigError(f"--exit-duration-in-mins {self.exit_duration_in_mins!r}: must "
                              "be > 0 (or left out)")
        if self.loss_spike_factor is not None and not self.loss_spike_factor > 1:
            raise ConfigError(f"--loss-spike-factor {self.loss_spike_factor!r}: must be > 1 "
                              "(e.g. 3: stop when the loss triples its running mean)")
        if not isinstance(self.collapse_patience, int) or self.collapse_patience < 0:
            raise ConfigError(f"--collapse-patience {self.collapse_patience!r}: must be an "
                              "integer >= 0 (iterations at ln V before stopping; 0: off)")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ConfigError("--override-opt-param-scheduler and "
                              "--use-checkpoint-opt-param-scheduler contradict each other: "
                              "choose this run's schedule or the checkpoint's")
        if self.finetune and not self.load:
            raise ConfigError("--finetune needs --load CHECKPOINT (the weights to start from); "
                              "without it the run would train from random weights")
        return self


class TrainingDiverged(RuntimeError):
    """Non-finite loss / gradient norm, a loss spike, or a collapse to ln V; raised on every
    rank, nothing saved. ``since``: the first iteration of a collapse (checkpoints from it on
    predict uniformly)."""

    def __init__(self, message: str, since: int | None = None):
        super().__init__(message)
        self.since = since


# --- directory layout ----------------------------------------------------------------------

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


# --- configuration record and the shape check -----------------------------------------------

def run_record(model_cfg, tempnet_cfg, train_cfg, ctx) -> dict:
    """What a checkpoint remembers of the run that saved it (plain dicts)."""
    return {"model": dataclasses.asdict(model_cfg), "tempnet": dataclasses.asdict(tempnet_cfg),
            "train": dataclasses.asdict(train_cfg),
            "parallel": {"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size}}


def shape_mismatches(saved: dict, current: dict, *, finetune: bool) -> list[str]:
    """'field: checkpoint X, this run Y' for every field whose difference changes tensor shapes
    (or, when resuming, the set of trained tensors)."""
    out = []
    sm, cm = saved["model"], current["model"]
    fields = SHAPE_FIELDS + (("max_position_embeddings",) if cm["family"] == "gpt" else ())
    for name in fields:
        if sm.get(name) != cm.get(name):
            out.append(f"{name}: checkpoint {sm.get(name)!r}, this run {cm.get(name)!r}")
    st, ct = saved["tempnet"], current["tempnet"]
    both_tempnet = {st["loss_mode"], ct["loss_mode"]} <= set(TEMPNET_LOSS_MODES)  # both heads
    saved_arch = st.get("arch", "paper")  # checkpoints from before --tempnet-arch: the paper's
    if both_tempnet and saved_arch == ct["arch"] and st["hidden_size"] != ct["hidden_size"]:
        out.append(f"tempnet hidden_size: checkpoint {st['hidden_size']!r}, this run "
                   f"{ct['hidden_size']!r}")
    if both_tempnet and not finetune and saved_arch != ct["arch"]:
        out.append(f"tempnet arch: checkpoint {saved_arch!r}, this run {ct['arch']!r} (pass "
                   f"--tempnet-arch {saved_arch}, or --finetune to load the LM weights only "
                   "and start this run's TempNet from its init)")
    if not finetune and st["loss_mode"] != ct["loss_mode"]:
        out.append(f"tempnet loss_mode: checkpoint {st['loss_mode']!r}, this run "
                   f"{ct['loss_mode']!r} (use --finetune to load the LM weights only)")
    return out


def check_shapes(path: Path, saved: dict, current: dict, *, finetune: bool) -> None:
    bad = shape_mismatches(saved, current, finetune=finetune)
    if bad:
        raise ConfigError(f"checkpoint {path} was saved with another model shape: "
                          + "; ".join(bad) + ". Use the model flags of the run that saved it.")


# Settings that change what a loaded model computes (evaluation and resume; --finetune may
# change them), what a resume's data order is, and its lr / weight-decay schedule.
TEMPNET_SEMANTIC_FIELDS = ("tau_min", "tau_max", "rho", "fixed_tau", "input_convention")
DATA_ORDER_FIELDS = ("seq_length", "seed")
SCHEDULE_FIELDS = {"train": ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style",
                             "weight_decay"),
                   "tempnet": ("lr", "lr_schedule", "weight_decay")}


def _flag(section: str, name: str) -> str:
    return ("--tempnet-" if section == "tempnet" else "--") + name.replace("_", "-")


def _differences(saved: dict, current: dict, fields) -> list[tuple[str, object, object]]:
    """(flag, checkpoint value, this run's value) for each (section, field) that differs
    (fields missing in an older checkpoint's record are not compared)."""
    out = []
    for section, name in fields:
        old, new = saved.get(section, {}), current[section]
        if name in old and old[name] != new.get(name):
            out.append((_flag(section, name), old[name], new.get(name)))
    return out


def _describe(diffs) -> str:
    return "; ".join(f"{flag}: checkpoint {old!r}, this run {new!r}" for flag, old, new in diffs)


def semantic_differences(saved: dict, current: dict) -> list:
    """TempNet settings that change every number of a loaded TempNet / DRO model."""
    if current["tempnet"]["loss_mode"] == "ce":
        return []
    return _differences(saved, current, [("tempnet", n) for n in TEMPNET_SEMANTIC_FIELDS])


def schedule_differences(saved: dict, current: dict) -> list:
    """lr / weight-decay schedule settings that differ (the decay length as the scheduler
    sees it: --lr-decay-iters, else --train-iters)."""
    fields = [(s, n) for s, names in SCHEDULE_FIELDS.items() for n in names
              if s == "train" or current["tempnet"]["loss_mode"] != "ce"]
    diffs = _differences(saved, current, fields)
    decay = [r["train"].get("lr_decay_iters") or r["train"].get("train_iters")
             for r in (saved, current)]
    if decay[0] != decay[1] and current["train"]["lr_decay_style"] != "constant":
        diffs.append(("--lr-decay-iters (default: --train-iters)", *decay))
    return diffs


# --- RNG states ------------------------------------------------------------------------------

def get_rng_state() -> dict:
    from megatron.core import tensor_parallel

    from megatron_tempnet.parallel import cpu

    tracker = tensor_parallel.get_cuda_rng_tracker()
    use_cuda = torch.cuda.is_available() and not cpu.is_active()
    return {"random": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if use_cuda else None,
            "tracker": {k: v.clone() for k, v in tracker.get_states().items()}}


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {k: v.clone() for k, v in state["tracker"].items()})
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_sharded_object(ctx, state: dict | None):
    """This rank's RNG states as one shard of a (PP, TP, DP) grid of objects."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", state, (ctx.pp_size, ctx.tp_size, ctx.dp_size),
                         (ctx.pp_rank, ctx.tp_rank, ctx.dp_rank), replica_id=0)


# --- save and load -----------------------------------------------------------------------------

def _unwrap(chunk):
    return getattr(chunk, "module", chunk)  # DDP -> the model: no wrapper prefixes in keys


def model_keys(model_chunks: list) -> list[str]:
    """Megatron-LM's keys: "model", or "model0", "model1", ... with virtual pipeline chunks."""
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def model_sharded_state_dict(model_chunks: list) -> dict:
    return {key: _unwrap(chunk).sharded_state_dict()
            for key, chunk in zip(model_keys(model_chunks), model_chunks)}


def optimizer_sharded_state_dict(optimizer, model_state_dict: dict, is_loading: bool = False):
    """optimizer.sharded_state_dict; megatron-core runs gc.collect() in it (fully_reshardable),
    which costs ~0.4 s per call over an interpreter full of modules: frozen objects are skipped."""
    gc.freeze()
    try:
        return optimizer.sharded_state_dict(model_state_dict, is_loading=is_loading,
                                            metadata=OPTIMIZER_METADATA)
    finally:
        gc.unfreeze()


def save_sharded(state_dict: dict, path: Path) -> None:
    """megatron-core's dist_checkpointing.save (a seam: tests inject a crash here). Its warning
    about a non-empty directory is dropped when the directory holds only our writer.json."""
    import logging

    from megatron.core import dist_checkpointing

    ours = [p.name for p in path.iterdir()] == [save_dir.WRITER_FILE]
    drop = logging.Filter()
    drop.filter = lambda record: not (ours and "Overwriting old incomplete" in record.getMessage())
    log = logging.getLogger("megatron.core.dist_checkpointing.serialization")
    log.addFilter(drop)
    try:
        dist_checkpointing.save(state_dict, str(path))
    finally:
        log.removeFilter(drop)


def ensure_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer zero Adam state before a load (megatron-core 0.16's
    DistributedOptimizer.state_dict asserts one common 'step' and finds none with torch's Adam,
    i.e. without apex / Transformer Engine); the load then overwrites every value."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(p.data),
                                      "exp_avg_sq": torch.zeros_like(p.data)}


def load_optimizer_state(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict``, around two issues of megatron-core 0.16.1's
    DistributedOptimizer with torch's Adam (no apex / Transformer Engine, e.g. on the CPU):
    (a) its load_state_dict gives every Adam state a 'step' and then copies every state key from
        the checkpoint's per-parameter tensors, which have no 'step' (KeyError);
    (b) all those states share ONE step tensor, which torch's Adam increments once per parameter.
    So: load groups and step first, then the parameter state without 'step', then give each
    parameter its own step tensor."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state_dict] if len(opts) == 1 else [v for _, v in sorted(state_dict.items())]
    for opt, state in zip(opts, states):
        if not (isinstance(opt, DistributedOptimizer) and "param_state" in state):
            opt.load_state_dict(state)
            continue
        state = dict(state)
        param_state, kind = state.pop("param_state"), state.pop("param_state_sharding_type")
        opt.load_state_dict(state)  # param groups, step, state allocation
        adam = opt.optimizer.state
        steps = {p: s.pop("step") for p, s in adam.items() if "step" in s}
        getattr(opt, f"load_parameter_state_from_{PARAM_STATE_LOADERS[kind]}")(param_state)
        for p, step in steps.items():
            adam[p]["step"] = step.clone()


# Param-group entries the scheduler reads (kept from this run under
# --override-opt-param-scheduler; the optimizer's load replaces them with the checkpoint's).
SCHEDULE_GROUP_KEYS = ("max_lr", "min_lr", "constant_lr", "weight_decay", "start_wd", "end_wd",
                       "lr_mult", "wd_mult")


# DistributedOptimizer param_state_sharding_type -> its load_parameter_state_from_* method
PARAM_STATE_LOADERS = {"fully_reshardable": "fully_reshardable",
                       "fully_sharded_model_space": "fs_model_space",
                       "dp_reshardable": "dp_reshardable", "dp_zero_gather_scatter": "dp_zero"}


DISK_FULL_BYTES = 64 << 20  # a failed write with less free space than this: the disk is full


def raise_if_disk_full(exc: Exception, path: Path, latest: int | None) -> None:
    """A save that failed on a full disk (torch's serializer reports it as "unexpected pos
    ..."; the ENOSPC may be lost) -> one ConfigError line naming it; else return."""

    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        free = None
    if disk_full_cause(exc) is None and (free is None or free >= DISK_FULL_BYTES):
        return
    errno_text = re.search(r"\[Errno \d+\][^:;)]*", " ".join(str(exc).split()))
    cause = errno_text.group(0).strip() if errno_text else type(exc).__name__
    kept = (f"the marker still names iteration {latest}" if latest is not None
            else "no checkpoint was complete before it")
    raise ConfigError(f"no space left on the device while saving {path} ({free or 0:,} bytes "
                      f"free; {cause}): free space or --save elsewhere and resume; "
                      f"{kept}, the checkpoints already written are unchanged") from exc


def _barrier():
    if dist.is_initialized():
        dist.barrier()


@dataclass
class LoadPlan:
    """What a ``--load`` restores, decided before any tensor is read."""

    path: Path
    saved: dict  # iteration, consumed_samples, config (the run record) of the checkpoint
    resume: bool  # not --finetune: iteration, data position, scheduler
    load_optim: bool  # the optimizer state and the scheduler's
    load_rng: bool  # the RNG states (same parallel layout only)


class Checkpointer:
    """Saves and loads the whole training state of this rank's model chunks (megatron-core
    ``dist_checkpointing``). The protocol (:meth:`due`, :meth:`save`, :meth:`plan_load`,
    :meth:`finish_load`) is shared with ``training.deepspeed.DeepSpeedCheckpointer``, which
    replaces :meth:`write` and :meth:`load`."""

    FORMAT = "torch_dist"  # a key of CHECKPOINT_FORMATS

    def __init__(self, cfg: CheckpointConfig, model_chunks: list, optimizer, scheduler, ctx,
                 record: dict, log=print):
        self.cfg, self.chunks = cfg, model_chunks
        self.optimizer, self.scheduler = optimizer, scheduler
        self.ctx, self.record, self.log = ctx, record, log
        self.last_saved: int | None = None
        self.lineage: str | None = None  # set by plan_load (save_dir.py)
        self._schedule_groups: list | None = None  # --override-opt-param-scheduler

    def due(self, iteration: int, stopping: bool) -> bool:
        """Save now? Every save_interval iterations, and whenever the run stops early or ends."""
        if not self.cfg.save or iteration == self.last_saved:
            return False
        interval = self.cfg.save_interval
        return stopping or (interval is not None and iteration % interval == 0)

    def save(self, iteration: int, consumed_samples: int) -> Path:
        """1. every rank checks that an existing directory of this iteration is this lineage's
        (save_dir.py); rank 0 clears it and records the writer; 2. every rank writes its part
        (:meth:`write`; the RNG states untouched by the save); 3. the ranks hash the files into
        the checkpoint's checksums.json (integrity.py); 4. rank 0 points the marker at it, then
        5. deletes this lineage's checkpoints beyond keep_last. A full disk ends as one line
        naming it; the marker still names the previous checkpoint."""
        root, rank0 = Path(self.cfg.save), self.ctx.rank == 0
        path = iteration_dir(root, iteration)
        if read_latest(root) == iteration:  # every rank raises: nobody waits at a barrier
            raise ConfigError(f"--save {root}: {path} is the current checkpoint; refusing to "
                              "overwrite it (save into another directory)")
        save_dir.may_replace(path, self.lineage)  # every rank decides alike, before any change
        _barrier()
        t0 = time.perf_counter()
        try:
            if rank0:
                if path.exists():
                    self.log(f"replacing {path}: an unfinished save of this run")
                    shutil.rmtree(path)
                path.mkdir(parents=True)
                save_dir.write_writer(path, self.lineage, iteration)
            _barrier()
            rng = get_rng_state()
            self.write(path, iteration, consumed_samples, rng)
            set_rng_state(rng)  # saving must not move any generator: resume stays bitwise exact
            _barrier()
            if not self.cfg.no_checkpoint_checksums:
                integrity.write_manifest(path)
        except BaseException as e:  # torch's CheckpointException is a BaseException
            if isinstance(e, Exception) or type(e).__name__ == "CheckpointException":
                raise_if_disk_full(e, path, read_latest(root))
            raise
        if rank0:
            write_latest(root, iteration)
            if self.cfg.keep_last:
                prune_checkpoints(root, self.cfg.keep_last, self.lineage)
        _barrier()
        self.last_saved = iteration
        if rank0:
            self.log(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f} s)")
        return path

    def common_state(self, iteration: int, consumed_samples: int) -> dict:
        """What every format stores beside the tensors (the run record: the shape check)."""
        return {"iteration": iteration, "consumed_samples": consumed_samples,
                "scheduler": self.scheduler.state_dict(),
                "checkpoint_version": CHECKPOINT_VERSION, "config": self.record,
                "lineage": self.lineage}

    def write(self, path: Path, iteration: int, consumed_samples: int, rng: dict) -> None:
        """This rank's shards of the whole training state into ``path``."""
        state_dict = model_sharded_state_dict(self.chunks)
        state_dict.update(
            optimizer=optimizer_sharded_state_dict(self.optimizer, state_dict),
            rng_state=rng_sharded_object(self.ctx, rng),
            **self.common_state(iteration, consumed_samples))
        save_sharded(state_dict, path)

    def plan_load(self, read_saved) -> LoadPlan | None:
        """Resolve ``--load`` (None: nothing to load), decide what to restore, check that the
        checkpoint fits this run, and claim ``--save`` (lock, lineage: save_dir.py).
        ``read_saved(path)`` returns the checkpoint's common state (no tensors read)."""
        plan = self._plan(read_saved)
        if plan is None and (self.cfg.finetune or self.record["tempnet"].get(
                "training_mode") in ("finetune", "frozen_lm")):
            mode = self.record["tempnet"].get("training_mode")
            what = "--finetune" if self.cfg.finetune else f"--tempnet-training-mode {mode}"
            raise ConfigError(f"{what} starts from a trained LM, but --load "
                              f"{self.cfg.load or '(not given)'} holds no checkpoint: pass "
                              "--load with the LM's checkpoint (the SLURM scripts: "
                              "FINETUNE_FROM); without one it would train from random weights")
        self.lineage = self._claim_save_dir(plan)
        return plan

    def _plan(self, read_saved) -> LoadPlan | None:
        """What ``--load`` restores. Its run record must give this run's tensor shapes and
        TempNet settings; a resume also its data order and lr schedule (or the flags saying
        which schedule wins). RNG states are restored at the same (TP, PP, DP) layout only."""
        cfg = self.cfg
        if not cfg.load:
            return None
        path = resolve_load_dir(cfg.load, cfg.save, self.FORMAT)
        if path is None:
            if self.ctx.rank == 0:
                self.log(f"no checkpoint in {cfg.load} yet: starting from scratch")
            return None
        if not cfg.no_checkpoint_checksums:
            status = integrity.verify_manifest(path)
            if status != "verified" and self.ctx.rank == 0:
                self.log(f"warning: {path} has no {integrity.MANIFEST} (saved before checksums "
                         "were recorded): its files are not verified")
        saved = read_saved(path)
        check_shapes(path, saved["config"], self.record, finetune=cfg.finetune)
        resume = not cfg.finetune
        if resume:
            self._check_resume(path, saved)
        saved_layout = saved["config"]["parallel"]
        load_rng = resume and not cfg.no_load_rng and saved_layout == self.layout()
        if resume and not cfg.no_load_rng and not load_rng and self.ctx.rank == 0:
            self.log(f"warning: {path} was saved at {saved_layout}, this run is "
                     f"{self.layout()}: RNG states not restored (the run continues, not bitwise)")
        return LoadPlan(path, saved, resume, resume and not cfg.no_load_optim, load_rng)

    def _check_resume(self, path: Path, saved: dict) -> None:
        """Settings a resume (and an evaluation) may not change silently; one line each."""
        record, cfg, rank0 = saved["config"], self.cfg, self.ctx.rank == 0
        fix = ("pass the checkpoint's value, or --finetune to start a new run (iteration 0) "
               "from these weights")
        diffs = semantic_differences(record, self.record)
        if diffs:
            raise ConfigError(f"checkpoint {path} was trained with other TempNet settings ("
                              f"{_describe(diffs)}): they change every number it computes; "
                              + fix)
        if self.scheduler is None:  # evaluation: no data order, no schedule
            return
        diffs = _differences(record, self.record, [("train", n) for n in DATA_ORDER_FIELDS])
        if diffs:
            raise ConfigError(f"checkpoint {path}: {_describe(diffs)}: a resume continues the "
                              "checkpoint's data order at its consumed samples; " + fix)
        old_gbs = record["train"].get("global_batch_size")
        new_gbs = self.record["train"]["global_batch_size"]
        if old_gbs != new_gbs and rank0:
            self.log(f"note: --global-batch-size {new_gbs} (the checkpoint used {old_gbs}): "
                     f"the data position continues at the checkpoint's "
                     f"{saved['consumed_samples']} consumed samples")
        diffs = schedule_differences(record, self.record)
        if not diffs or cfg.no_load_optim:  # --no-load-optim: this run's schedule already
            return
        if cfg.override_opt_param_scheduler:
            self.scheduler.override_opt_param_scheduler = True
            self.scheduler.use_checkpoint_opt_param_scheduler = False
            self._schedule_groups = [{k: g[k] for k in SCHEDULE_GROUP_KEYS if k in g}
                                     for g in self.optimizer.param_groups]
            if rank0:
                self.log(f"--override-opt-param-scheduler: this run's schedule ("
                         f"{_describe(diffs)}); the optimizer state is loaded")
        elif cfg.use_checkpoint_opt_param_scheduler:
            if rank0:
                self.log(f"--use-checkpoint-opt-param-scheduler: the checkpoint's schedule wins "
                         f"({_describe(diffs)})")
        else:
            raise ConfigError(
                f"checkpoint {path} was trained with another lr / weight-decay schedule ("
                f"{_describe(diffs)}): pass the checkpoint's values, "
                "--override-opt-param-scheduler (this run's values; the Adam state is kept), or "
                "--use-checkpoint-opt-param-scheduler (the checkpoint's)")

    def _claim_save_dir(self, plan: LoadPlan | None) -> str | None:
        """Rank 0 locks ``--save`` and decides the lineage (save_dir.claim); every rank gets
        the same lineage or raises the same error. None without --save."""
        cfg = self.cfg
        resuming = plan is not None and plan.resume
        lineage = plan.saved.get("lineage") if resuming else None
        if not cfg.save:
            return lineage
        result = None
        if self.ctx.rank == 0:
            root = Path(cfg.save)
            try:
                save_dir.acquire_lock(root)
                result = ("ok", save_dir.claim(root, lineage, complete_iterations(root),
                                               resuming, cfg.load))
            except ConfigError as e:
                result = ("error", str(e))
        if dist.is_initialized():
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        if result[0] == "error":
            raise ConfigError(result[1])
        return result[1]

    def close(self) -> None:
        """Release ``--save``'s lock (a process that exits releases it too)."""
        if self.cfg.save and self.ctx.rank == 0:
            save_dir.release_lock(self.cfg.save)

    def layout(self) -> dict:
        return {"tp": self.ctx.tp_size, "pp": self.ctx.pp_size, "dp": self.ctx.dp_size}

    def finish_load(self, plan: LoadPlan, scheduler_state: dict | None, rng: dict | None,
                    what: str) -> tuple[int, int]:
        """After the format's own load: the scheduler (its state with the optimizer's; with
        --no-load-optim the lr schedule continues at the loaded iteration), the RNG states,
        one log line; returns (iteration, consumed_samples), (0, 0) with --finetune."""
        if plan.load_optim:
            self.scheduler.load_state_dict(scheduler_state)
            for group, values in zip(self.optimizer.param_groups, self._schedule_groups or []):
                group.update(values)  # --override-opt-param-scheduler: this run's lr / wd
        elif plan.resume and self.scheduler is not None:  # --no-load-optim: a fresh optimizer,
            self.scheduler.step(increment=plan.saved["iteration"])  # the lr schedule goes on
        if plan.load_rng:
            set_rng_state(rng)
        if self.ctx.rank == 0:
            if plan.load_optim:
                what += ", optimizer, scheduler"
            self.log(f"loaded {what} from {plan.path}"
                     + (f" at iteration {plan.saved['iteration']}" if plan.resume else ""))
        if not plan.resume:
            return 0, 0
        return plan.saved["iteration"], plan.saved["consumed_samples"]

    def load(self) -> tuple[int, int]:
        """Restore from ``--load``; returns (iteration, consumed_samples), (0, 0) when nothing
        was loaded or with --finetune."""
        from megatron.core import dist_checkpointing

        plan = self.plan_load(lambda path: dist_checkpointing.load_common_state_dict(str(path)))
        if plan is None:
            return 0, 0
        path = plan.path
        state_dict = model_sharded_state_dict(self.chunks)
        skipped = self._drop_absent_tempnet(state_dict, path) if self.cfg.finetune else []
        if plan.load_optim:
            ensure_optimizer_state(self.optimizer)
            state_dict["optimizer"] = optimizer_sharded_state_dict(self.optimizer, state_dict,
                                                                   is_loading=True)
        if plan.load_rng:
            state_dict["rng_state"] = rng_sharded_object(self.ctx, None)
        loaded = dist_checkpointing.load(state_dict, str(path))

        for key, chunk in zip(model_keys(self.chunks), self.chunks):
            missing, unexpected = _unwrap(chunk).load_state_dict(loaded[key], strict=False)
            missing = [m for m in missing if m not in skipped and not m.endswith("_extra_state")]
            if missing or unexpected:
                raise ConfigError(f"checkpoint {path}: missing {missing}, unexpected "
                                  f"{unexpected} model keys")
        if plan.load_optim:
            load_optimizer_state(self.optimizer, loaded["optimizer"])
        return self.finish_load(plan, loaded.get("scheduler"), loaded.get("rng_state"),
                                model_weights_loaded(skipped))

    def _drop_absent_tempnet(self, state_dict: dict, path: Path) -> list[str]:
        """--finetune from a checkpoint without TempNet: TempNet's tensors keep their init."""
        from megatron.core import dist_checkpointing

        saved_keys = set(dist_checkpointing.load_tensors_metadata(str(path)))
        dropped = []
        for chunk_sd in (state_dict[k] for k in model_keys(self.chunks)):
            for name in [n for n, t in chunk_sd.items()
                         if n.startswith("tempnet.") and getattr(t, "key", n) not in saved_keys]:
                del chunk_sd[name]
                dropped.append(name)
        return dropped


def model_weights_loaded(skipped: list) -> str:
    """The log's "loaded ..." words for the model weights (TempNet tensors kept at init)."""
    return "model weights" + (f" (TempNet kept its init: {len(skipped)} tensors not in the "
                              "checkpoint)" if skipped else "")


# --- when to stop --------------------------------------------------------------------------------

@dataclass
class Stop:
    exit_code: int
    message: str


class RunControl:
    """Per-iteration decisions shared by all ranks: stop on a signal or time limit (save first),
    or raise :class:`TrainingDiverged` on a non-finite loss / grad norm or a loss spike.

    Use as a context manager: it installs the SIGTERM / SIGUSR1 handlers and restores the old
    ones on exit. :meth:`check` costs one all-reduce of 5 numbers over all ranks per iteration.
    """

    SPIKE_WARMUP_ITERS = 10  # iterations before the running mean is trusted
    SPIKE_EMA = 0.9
    COLLAPSE_LEARNED = 0.1  # the collapse check starts once the loss was 10% below ln V
    COLLAPSE_TOLERANCE = 0.01  # "at ln V": within 1% of it, or above

    def __init__(self, cfg: CheckpointConfig | None = None, start_time: float | None = None,
                 device="cpu", vocab_size: int | None = None):
        self.cfg = cfg or CheckpointConfig()
        self.device, self.vocab_size = device, vocab_size
        self.start_time = time.time() if start_time is None else start_time
        self.signal_received: int | None = None
        self._old_handlers: dict = {}
        self._depth = 0
        self._mean_loss, self._seen = None, 0
        self._best_loss, self._uniform_since = math.inf, None

    def __enter__(self) -> "RunControl":
        """Install the handlers (re-entrant: train.py enters before start-up, the loop again)."""
        self._depth += 1
        if self._depth == 1 and self.cfg.exit_signal_handler:
            for sig in STOP_SIGNALS:
                old = signal.signal(sig, self._on_signal)
                if isinstance(old, EarlySignals):  # the command's start-up record
                    self.signal_received = self.signal_received or old.received
                    old = signal.SIG_DFL
                self._old_handlers[sig] = old
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth:
            return
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        self.signal_received = signum

    def stop_before_training(self) -> Stop | None:
        """A SIGTERM / SIGUSR1 received during start-up (or --load): every rank agrees to stop
        before the first iteration, with the preemption exit code (nothing new to save)."""
        flag = torch.tensor([float(self.signal_received is not None)], dtype=torch.float64,
                            device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag)
        if not flag.item():
            return None
        name = (signal.Signals(self.signal_received).name if self.signal_received
                else "a signal on another rank")
        return Stop(EXIT_CODE_PREEMPTED, f"received {name} during start-up: stopping before "
                                         f"training (exit code {EXIT_CODE_PREEMPTED})")

    def check(self, iteration: int, reports: list, grad_norm) -> Stop | None:
        """After an iteration's optimizer step: agree with every rank on what happens next."""
        losses = [r[k][0] for r in reports for k in ("lm loss", "dro loss") if k in r]
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        bad = (~torch.isfinite(torch.stack(losses))).any().double() if losses else zero
        ce = torch.stack([r["lm loss"] for r in reports]).double().sum(0) if reports else None
        bad_norm = grad_norm is not None and not math.isfinite(grad_norm)
        minutes = (time.time() - self.start_time) / 60
        over_time = (self.cfg.exit_duration_in_mins is not None
                     and minutes >= self.cfg.exit_duration_in_mins)
        # [non-finite, signal, time limit, lm loss sum, token count], summed over all ranks
        # (reports exist on the last pipeline stage only; TP replicas count both sum and tokens)
        flags = torch.stack([bad + bad_norm, zero + (self.signal_received is not None),
                             zero + over_time, *(ce if ce is not None else (zero, zero))])
        if dist.is_initialized():
            dist.all_reduce(flags)
        bad, signalled, over_time, loss_sum, loss_count = flags.tolist()
        loss = loss_sum / loss_count if loss_count else float("nan")
        if bad:
            raise TrainingDiverged(
                f"iteration {iteration}: non-finite training numbers (lm loss {loss:.4g}, grad "
                f"norm {grad_norm}): stopping without saving a checkpoint")
        self._check_spike(iteration, loss)
        self._check_collapse(iteration, loss)
        if signalled:
            name = (signal.Signals(self.signal_received).name if self.signal_received
                    else "a signal on another rank")
            return Stop(EXIT_CODE_PREEMPTED, f"iteration {iteration}: received {name}: "
                                             f"stopping (exit code {EXIT_CODE_PREEMPTED})")
        if over_time:
            return Stop(EXIT_CODE_TIME_LIMIT,
                        f"iteration {iteration}: --exit-duration-in-mins "
                        f"{self.cfg.exit_duration_in_mins} reached: stopping (exit code "
                        f"{EXIT_CODE_TIME_LIMIT})")
        return None

    def _check_spike(self, iteration: int, loss: float) -> None:
        factor = self.cfg.loss_spike_factor
        if factor is None or not math.isfinite(loss):
            return
        if self._seen >= self.SPIKE_WARMUP_ITERS and loss > factor * self._mean_loss:
            raise TrainingDiverged(
                f"iteration {iteration}: lm loss {loss:.4f} > --loss-spike-factor {factor} x "
                f"running mean {self._mean_loss:.4f}: stopping without saving a checkpoint")
        self._mean_loss = loss if self._mean_loss is None else (
            self.SPIKE_EMA * self._mean_loss + (1 - self.SPIKE_EMA) * loss)
        self._seen += 1

    def _check_collapse(self, iteration: int, loss: float) -> None:
        """The plateau at ln V: a model that learned (loss 10% below ln V) and then sits at
        ln V (uniform predictions: what a NaN guard's "last good" checkpoint may already do)
        for --collapse-patience iterations."""
        patience, vocab = self.cfg.collapse_patience, self.vocab_size
        if not patience or not vocab or vocab < 2 or not math.isfinite(loss):
            return
        ln_v = math.log(vocab)
        self._best_loss = min(self._best_loss, loss)
        if self._best_loss > (1 - self.COLLAPSE_LEARNED) * ln_v:
            return  # not learned yet: the start of a run from scratch sits at ln V too
        if loss < (1 - self.COLLAPSE_TOLERANCE) * ln_v:
            self._uniform_since = None
            return
        self._uniform_since = self._uniform_since or iteration
        if iteration - self._uniform_since + 1 >= patience:
            raise TrainingDiverged(
                f"iteration {iteration}: lm loss {loss:.4f} has sat at ln V = {ln_v:.4f} "
                f"(uniform predictions over the vocabulary of {vocab}) since iteration "
                f"{self._uniform_since}, after reaching {self._best_loss:.4f}: the model "
                f"collapsed (--collapse-patience {patience}; 0 turns the check off); stopping "
                "without saving a checkpoint", since=self._uniform_since)
