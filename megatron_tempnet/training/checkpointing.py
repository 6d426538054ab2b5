"""Checkpoints (megatron-core ``dist_checkpointing``): the save / load protocol.

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

Under ``--deepspeed`` the same marker names ``iter_*`` directories that hold DeepSpeed's own
checkpoint (``training/deepspeed.py``, ``DeepSpeedCheckpointer``); :class:`Checkpointer` holds
what both formats share: when to save, the save protocol (stale directory cleared, every rank
writes, barrier, marker, keep-last), the shape check, which states a resume restores, and the
scheduler / RNG / data position it hands back. Each format refuses the other's checkpoints by
name (``checkpoint_layout.CHECKPOINT_FORMATS``).

Where the parts live (this module: :class:`Checkpointer`, :class:`LoadPlan`, the model's
sharded state dict, :func:`save_sharded`, the full-disk error):
- ``checkpoint_config.py``: :class:`CheckpointConfig` (the flags; no torch);
- ``checkpoint_layout.py``: the directory layout, the marker, formats, keep-last pruning and
  which checkpoint ``--load`` names;
- ``run_record.py``: what a checkpoint remembers of its run, the shape check and the TempNet /
  data-order / schedule comparisons;
- ``rng_state.py``: the RNG states a checkpoint stores;
- ``mcore_optimizer_state.py``: megatron-core's optimizer state and the two workarounds
  megatron-core 0.16.1 with torch's Adam (no apex / TE) needs on load;
- ``run_control.py``: when a run stops (signals, time limit, divergence) and its exit codes.
"""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_tempnet.cli import disk_full_cause
from megatron_tempnet.config import ConfigError
from megatron_tempnet.training.ddp import params_synced
from megatron_tempnet.training import integrity, save_dir
from megatron_tempnet.training.checkpoint_config import CheckpointConfig
from megatron_tempnet.training.checkpoint_layout import (CHECKPOINT_VERSION, complete_iterations,
                                                         iteration_dir, prune_checkpoints,
                                                         read_latest, resolve_load_dir,
                                                         write_latest)
from megatron_tempnet.training.mcore_optimizer_state import (SCHEDULE_GROUP_KEYS,
                                                             ensure_optimizer_state,
                                                             load_optimizer_state,
                                                             optimizer_sharded_state_dict)
from megatron_tempnet.training.rng_state import get_rng_state, rng_sharded_object, set_rng_state
from megatron_tempnet.training.run_record import (check_shapes, data_order_differences,
                                                  describe_differences, schedule_differences,
                                                  semantic_differences)


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)  # DDP -> the model: no wrapper prefixes in keys


def model_keys(model_chunks: list) -> list[str]:
    """Megatron-LM's keys: "model", or "model0", "model1", ... with virtual pipeline chunks."""
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def model_sharded_state_dict(model_chunks: list) -> dict:
    return {key: _unwrap(chunk).sharded_state_dict()
            for key, chunk in zip(model_keys(model_chunks), model_chunks)}


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


# In the common state of a checkpoint converted from elsewhere (model weights, no optimizer or
# RNG state): where its weights came from
WEIGHTS_ONLY = "model_weights_only"

# The trainer's own state in a checkpoint (training/loop.py TrainLoop.state_dict)
TRAIN_STATE_KEYS = ("iteration", "consumed_samples")
OPTIONAL_TRAIN_STATE_KEYS = ("run_control",)  # absent from older checkpoints


def fresh_train_state() -> dict:
    return dict.fromkeys(TRAIN_STATE_KEYS, 0)


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

    def save(self, train_state: dict) -> Path:
        """Save the whole training state with ``train_state`` (the trainer's own
        ``state_dict()``: iteration, consumed_samples): 1. every rank checks that an existing
        directory of this iteration is this lineage's
        (save_dir.py); rank 0 clears it and records the writer; 2. every rank writes its part
        (:meth:`write`; the RNG states untouched by the save); 3. the ranks hash the files into
        the checkpoint's checksums.json (integrity.py); 4. rank 0 points the marker at it, then
        5. deletes this lineage's checkpoints beyond keep_last. A full disk ends as one line
        naming it; the marker still names the previous checkpoint."""
        root, rank0 = Path(self.cfg.save), self.ctx.rank == 0
        iteration = train_state["iteration"]
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
            with params_synced(self.chunks):  # --overlap-param-gather: this step's weights
                self.write(path, train_state, rng)
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

    def common_state(self, train_state: dict) -> dict:
        """What every format stores beside the tensors: the trainer's state (iteration,
        consumed_samples), the scheduler's, the run record (the shape check)."""
        return {**{k: train_state[k] for k in TRAIN_STATE_KEYS},
                **{k: train_state[k] for k in OPTIONAL_TRAIN_STATE_KEYS if k in train_state},
                "scheduler": self.scheduler.state_dict(),
                "checkpoint_version": CHECKPOINT_VERSION, "config": self.record,
                "lineage": self.lineage}

    def write(self, path: Path, train_state: dict, rng: dict) -> None:
        """This rank's shards of the whole training state into ``path``."""
        state_dict = model_sharded_state_dict(self.chunks)
        state_dict.update(
            optimizer=optimizer_sharded_state_dict(self.optimizer, state_dict),
            rng_state=rng_sharded_object(self.ctx, rng),
            **self.common_state(train_state))
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
        source = saved.get(WEIGHTS_ONLY)
        if resume and source and not (cfg.no_load_optim and cfg.no_load_rng):
            raise ConfigError(f"checkpoint {path} holds model weights only ({source}): start a "
                              "new run from them with --finetune, or continue its iteration "
                              "and data position with --no-load-optim --no-load-rng")
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
                              f"{describe_differences(diffs)}): they change every number it "
                              "computes; " + fix)
        if self.scheduler is None:  # evaluation: no data order, no schedule
            return
        diffs = data_order_differences(record, self.record)
        if diffs:
            raise ConfigError(f"checkpoint {path}: {describe_differences(diffs)}: a resume "
                              "continues the checkpoint's data order at its consumed samples; "
                              + fix)
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
                         f"{describe_differences(diffs)}); the optimizer state is loaded")
        elif cfg.use_checkpoint_opt_param_scheduler:
            if rank0:
                self.log(f"--use-checkpoint-opt-param-scheduler: the checkpoint's schedule wins "
                         f"({describe_differences(diffs)})")
        else:
            raise ConfigError(
                f"checkpoint {path} was trained with another lr / weight-decay schedule ("
                f"{describe_differences(diffs)}): pass the checkpoint's values, "
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
                if not cfg.no_save_lock:
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
                    what: str) -> dict:
        """After the format's own load: the scheduler (its state with the optimizer's; with
        --no-load-optim the lr schedule continues at the loaded iteration), the RNG states,
        one log line; returns the trainer's saved state (iteration, consumed_samples; a fresh
        start with --finetune)."""
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
            return fresh_train_state()
        return {k: plan.saved[k] for k in (*TRAIN_STATE_KEYS, *OPTIONAL_TRAIN_STATE_KEYS)
                if k in plan.saved}

    def load(self) -> dict:
        """Restore from ``--load``; returns the trainer's saved state (iteration,
        consumed_samples), a fresh start when nothing was loaded or with --finetune."""
        from megatron.core import dist_checkpointing

        plan = self.plan_load(lambda path: dist_checkpointing.load_common_state_dict(str(path)))
        if plan is None:
            return fresh_train_state()
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
