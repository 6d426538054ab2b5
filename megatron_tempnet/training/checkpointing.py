"""Checkpoints (megatron-core ``dist_checkpointing``), resume, and when a run stops.

Layout of ``--save DIR`` (Megatron-LM's, torch_dist format)::

    DIR/latest_checkpointed_iteration.txt   "100": the current checkpoint; written by rank 0,
                                            atomically (temp file + rename), only after every
                                            rank finished writing iter_0000100/
    DIR/iter_0000100/                       one dist_checkpointing directory:
        metadata.json, common.pt, *.distcp  written by megatron-core (metadata.json last)
      model       sharded tensors of every model chunk (TempNet included): load under another
                  TP/PP layout
      optimizer   megatron-core's optimizer.sharded_state_dict(model) (reshardable: TP/PP/DP)
      rng_state   one ShardedObject per rank (python, numpy, torch CPU, torch CUDA, megatron's
                  RNG-tracker states), global shape (PP, TP, DP)
      common      iteration, consumed_samples, scheduler state, checkpoint_version, and the run's
                  config (model / tempnet / train / parallel sections) for the shape check

Resume (``--load``) composes those state dicts (style.md practice 13): a run continued from a
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
- non-finite loss or gradient norm, or a loss spike (``--loss-spike-factor``): raise
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

from megatron_tempnet.config import ConfigError
from megatron_tempnet.tempnet.config import TEMPNET_LOSS_MODES

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
        return self


class TrainingDiverged(RuntimeError):
    """Non-finite loss / gradient norm or a loss spike; raised on every rank, nothing saved."""


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
    marker = Path(root) / LATEST_FILE
    tmp = marker.with_name(f".{LATEST_FILE}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)


def saved_iterations(root: str | os.PathLike) -> list[int]:
    return sorted(int(m.group(1)) for p in Path(root).glob("iter_*")
                  if p.is_dir() and (m := re.fullmatch(r"iter_(\d+)", p.name)))


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> list[int]:
    """Delete all but the newest ``keep_last`` checkpoints up to the current one; never the
    current one, never newer (unfinished) directories. Returns the deleted iterations."""
    latest = read_latest(root)
    if latest is None:
        return []
    older = [i for i in saved_iterations(root) if i <= latest]
    doomed = [i for i in older[:-keep_last] if i != latest]
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
    """megatron-core's dist_checkpointing.save (a seam: tests inject a crash here)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(state_dict, str(path))


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


# DistributedOptimizer param_state_sharding_type -> its load_parameter_state_from_* method
PARAM_STATE_LOADERS = {"fully_reshardable": "fully_reshardable",
                       "fully_sharded_model_space": "fs_model_space",
                       "dp_reshardable": "dp_reshardable", "dp_zero_gather_scatter": "dp_zero"}


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

    def due(self, iteration: int, stopping: bool) -> bool:
        """Save now? Every save_interval iterations, and whenever the run stops early or ends."""
        if not self.cfg.save or iteration == self.last_saved:
            return False
        interval = self.cfg.save_interval
        return stopping or (interval is not None and iteration % interval == 0)

    def save(self, iteration: int, consumed_samples: int) -> Path:
        """1. rank 0 clears a stale (unfinished) directory of this iteration; 2. every rank
        writes its part (:meth:`write`; the RNG states untouched by the save); 3. after a
        barrier rank 0 points the marker at it, then 4. deletes checkpoints beyond keep_last."""
        root, rank0 = Path(self.cfg.save), self.ctx.rank == 0
        path = iteration_dir(root, iteration)
        if read_latest(root) == iteration:  # every rank raises: nobody waits at a barrier
            raise ConfigError(f"--save {root}: {path} is the current checkpoint; refusing to "
                              "overwrite it (save into another directory)")
        if rank0:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        _barrier()
        t0 = time.perf_counter()
        rng = get_rng_state()
        self.write(path, iteration, consumed_samples, rng)
        set_rng_state(rng)  # saving must not move any generator: resume stays bitwise exact
        _barrier()
        if rank0:
            write_latest(root, iteration)
            if self.cfg.keep_last:
                prune_checkpoints(root, self.cfg.keep_last)
        _barrier()
        self.last_saved = iteration
        if rank0:
            self.log(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f} s)")
        return path

    def common_state(self, iteration: int, consumed_samples: int) -> dict:
        """What every format stores beside the tensors (the run record: the shape check)."""
        return {"iteration": iteration, "consumed_samples": consumed_samples,
                "scheduler": self.scheduler.state_dict(),
                "checkpoint_version": CHECKPOINT_VERSION, "config": self.record}

    def write(self, path: Path, iteration: int, consumed_samples: int, rng: dict) -> None:
        """This rank's shards of the whole training state into ``path``."""
        state_dict = model_sharded_state_dict(self.chunks)
        state_dict.update(
            optimizer=optimizer_sharded_state_dict(self.optimizer, state_dict),
            rng_state=rng_sharded_object(self.ctx, rng),
            **self.common_state(iteration, consumed_samples))
        save_sharded(state_dict, path)

    def plan_load(self, read_saved) -> LoadPlan | None:
        """Resolve ``--load`` (None: nothing to load) and decide what to restore.
        ``read_saved(path)`` returns the checkpoint's common state (no tensors read); its run
        record must give this run's tensor shapes. RNG states are restored at the same
        (TP, PP, DP) layout only."""
        cfg = self.cfg
        if not cfg.load:
            return None
        path = resolve_load_dir(cfg.load, cfg.save, self.FORMAT)
        if path is None:
            if self.ctx.rank == 0:
                self.log(f"no checkpoint in {cfg.load} yet: starting from scratch")
            return None
        saved = read_saved(path)
        check_shapes(path, saved["config"], self.record, finetune=cfg.finetune)
        resume = not cfg.finetune
        saved_layout = saved["config"]["parallel"]
        load_rng = resume and not cfg.no_load_rng and saved_layout == self.layout()
        if resume and not cfg.no_load_rng and not load_rng and self.ctx.rank == 0:
            self.log(f"warning: {path} was saved at {saved_layout}, this run is "
                     f"{self.layout()}: RNG states not restored (the run continues, not bitwise)")
        return LoadPlan(path, saved, resume, resume and not cfg.no_load_optim, load_rng)

    def layout(self) -> dict:
        return {"tp": self.ctx.tp_size, "pp": self.ctx.pp_size, "dp": self.ctx.dp_size}

    def finish_load(self, plan: LoadPlan, scheduler_state: dict | None, rng: dict | None,
                    what: str) -> tuple[int, int]:
        """After the format's own load: the scheduler (its state with the optimizer's; with
        --no-load-optim the lr schedule continues at the loaded iteration), the RNG states,
        one log line; returns (iteration, consumed_samples), (0, 0) with --finetune."""
        if plan.load_optim:
            self.scheduler.load_state_dict(scheduler_state)
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

    def __init__(self, cfg: CheckpointConfig | None = None, start_time: float | None = None,
                 device="cpu"):
        self.cfg = cfg or CheckpointConfig()
        self.device = device
        self.start_time = time.time() if start_time is None else start_time
        self.signal_received: int | None = None
        self._old_handlers: dict = {}
        self._mean_loss, self._seen = None, 0

    def __enter__(self) -> "RunControl":
        if self.cfg.exit_signal_handler:
            for sig in STOP_SIGNALS:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        self.signal_received = signum

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
