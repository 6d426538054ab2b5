"""Entry point: ``torchrun --nproc_per_node N -m megatron_tempnet.train --model tiny-llama ...``.

Builds, in order: process groups -> tokenizer -> datasets -> model stage -> DDP -> optimizer ->
scheduler -> checkpoint (--load) -> data position, then runs the train loop
(megatron_tempnet/training/loop.py). Exit codes: 0 done; checkpointing.EXIT_CODE_PREEMPTED (3,
SIGTERM/SIGUSR1) and EXIT_CODE_TIME_LIMIT (4, --exit-duration-in-mins) after saving a checkpoint;
EXIT_CODE_DIVERGED (5) on a non-finite loss / grad norm or a loss spike, nothing saved.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch.distributed as dist

from megatron_tempnet.arguments import RunConfig, parse_args
from megatron_tempnet.data.datasets import (build_datasets, build_micro_batch_iterator,
                                            num_samples)
from megatron_tempnet.data.tokenizers import load_tokenizer
from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
from megatron_tempnet.parallel import ParallelContext, initialize, shutdown
from megatron_tempnet.training.checkpointing import (EXIT_CODE_DIVERGED, Checkpointer, RunControl,
                                                     TrainingDiverged, read_latest, run_record)
from megatron_tempnet.training.ddp import wrap_ddp
from megatron_tempnet.training.evaluate import EvalCallback
from megatron_tempnet.training.flops import flops_per_token, peak_flops
from megatron_tempnet.training.loop import TrainState, train
from megatron_tempnet.training.metrics_log import MetricsCallback, MetricsLogger
from megatron_tempnet.training.optim import build_optimizer, build_scheduler, precision_dtype


def log(line: str) -> None:
    print(line, flush=True)


@dataclass
class Trainer:
    """Everything one run trains with, built by :func:`build` (tests and hooks reach in here)."""

    run: RunConfig
    ctx: ParallelContext
    model_chunks: list
    optimizer: object
    scheduler: object
    batches: object
    checkpointer: Checkpointer | None
    control: RunControl
    state: TrainState
    callbacks: list  # evaluation and metrics sinks, run after every iteration
    step: object = None  # the DeepSpeed engine's step; None: the megatron-core step

    def train(self, callbacks=()) -> TrainState:
        try:
            return train(self.model_chunks, self.optimizer, self.scheduler, self.batches,
                         self.run.train, self.ctx, state=self.state, log=log,
                         checkpointer=self.checkpointer, control=self.control,
                         callbacks=[*self.callbacks, *callbacks], step=self.step,
                         tau_range=self.run.tempnet.tau_range)
        finally:
            for callback in self.callbacks:
                if isinstance(callback, MetricsCallback):
                    callback.logger.close()


def build(run: RunConfig, start_time: float | None = None) -> Trainer:
    """Process groups (re)initialized in this process, data, model, optimizer, and --load."""
    par, tr, ck = run.parallel.validate(), run.train, run.checkpoint.validate()
    ctx = initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, tr.seed)
    tr.validate(ctx.dp_size)

    ev, ds = run.eval.validate(), run.deepspeed.validate()
    tokenizer = load_tokenizer(run.data.tokenizer_type, run.data.tokenizer_model)
    run.model.vocab_size = tokenizer.vocab_size
    n_train, n_valid, _ = num_samples(tr.train_iters, tr.global_batch_size, ev.eval_iters,
                                      ev.eval_interval or None)
    train_ds, valid_ds, _ = build_datasets(run.data, tokenizer, seq_length=tr.seq_length,
                                           seed=tr.seed, train_samples=n_train,
                                           valid_samples=n_valid)
    batches, valid_batches = (
        build_micro_batch_iterator(d, tr.micro_batch_size, tr.global_batch_size, ctx.dp_rank,
                                   ctx.dp_size, num_workers=run.data.num_workers)
        for d in (train_ds, valid_ds))

    model = build_tempnet_model(run.model, run.tempnet, ctx,
                                params_dtype=precision_dtype(tr.precision), seed=tr.seed)
    if ctx.rank == 0:
        n = sum(p.numel() for p in model.parameters())
        log(f"model {run.model.family}: {n:,} parameters on this stage "
            f"(TP={ctx.tp_size} PP={ctx.pp_size} DP={ctx.dp_size}), loss "
            f"{run.tempnet.loss_mode}, mode {run.tempnet.training_mode}")
    step = None
    if ds.deepspeed:
        chunks, optimizer, scheduler, step, checkpointer = _deepspeed(run, model, ctx)
    else:
        chunks = [wrap_ddp(model, use_distributed_optimizer=par.use_distributed_optimizer)]
        optimizer = build_optimizer(chunks, tr, tempnet_cfg=run.tempnet,
                                    use_distributed_optimizer=par.use_distributed_optimizer)
        scheduler = build_scheduler(optimizer, tr)
        checkpointer = Checkpointer(ck, chunks, optimizer, scheduler, ctx,
                                    run_record(run.model, run.tempnet, tr, ctx), log=log)
    iteration, consumed = checkpointer.load()
    if iteration == 0 and step is None:  # a fresh frozen_lm run: TempNet's start (see below)
        calibrate_initial_tau(run, chunks, optimizer, ctx, lambda: build_micro_batch_iterator(
            train_ds, tr.micro_batch_size, tr.global_batch_size, ctx.dp_rank, ctx.dp_size))
    batches.load_state_dict({"consumed_samples": consumed})
    return Trainer(run, ctx, chunks, optimizer, scheduler, batches, checkpointer,
                   RunControl(ck, start_time=start_time, device=ctx.device),
                   TrainState(iteration=iteration, consumed_samples=consumed),
                   _callbacks(run, chunks, valid_batches, ctx), step)


def calibrate_initial_tau(run: RunConfig, chunks: list, optimizer, ctx: ParallelContext,
                          training_batches) -> float | None:
    """--tempnet-arch scale_aware with --tempnet-training-mode frozen_lm and no --tempnet-tau0:
    start TempNet at the frozen LM's best single global temperature, measured (training/
    evaluate.py's grid search) on the first ``--eval-iters`` global batches of the TRAINING
    split (never the validation split), so that TempNet learns per-token corrections to the
    best constant. Only a head still at its init (not loaded from a checkpoint) is moved; the
    optimizer's main parameters are reloaded from the model. ``training_batches()``: a fresh
    iterator over this DP rank's training micro-batches from the first sample (the run's own
    iterator is not touched). Returns the tau set (or None)."""
    from megatron_tempnet.tempnet.head import ScaleAwareTempNetHead, start_at_tau
    from megatron_tempnet.training.evaluate import evaluate, unwrap_model

    cfg, tr = run.tempnet, run.train
    head = getattr(unwrap_model(chunks[-1]), "tempnet", None)
    if not (cfg.training_mode == "frozen_lm" and cfg.tau0 is None
            and isinstance(head, ScaleAwareTempNetHead)):
        return None
    if head.w_out.count_nonzero() or head.w_out_feat.count_nonzero() or float(head.b_out):
        return None  # TempNet came from the checkpoint
    n = run.eval.eval_iters or 10
    metrics = evaluate(chunks, iter(training_batches()), n, ctx, seq_length=tr.seq_length,
                       micro_batch_size=tr.micro_batch_size,
                       num_microbatches=tr.num_microbatches(ctx.dp_size), config=run.eval)
    tau = start_at_tau(head, metrics["best T"])
    optimizer.reload_model_params()  # main (fp32 / sharded) copies follow the model
    if ctx.rank == 0:
        log(f"TempNet starts at tau {tau:.4f}: the frozen LM's best global temperature on the "
            f"first {n} training batches (ppl {metrics['ppl tau=1']:.3f} at tau 1, "
            f"{metrics['ppl best T']:.3f} at T {metrics['best T']:.4f}); --tempnet-tau0 sets "
            "it by hand")
    return tau


def _callbacks(run: RunConfig, chunks: list, valid_batches, ctx: ParallelContext) -> list:
    """Metrics sinks (TensorBoard, JSONL) and periodic evaluation on the validation split."""
    tr = run.train
    logger = MetricsLogger(run.logging, ctx)
    tempnet_hidden = run.tempnet.hidden_size if run.tempnet.uses_tempnet else None
    callbacks = [MetricsCallback(
        logger, tr, ctx, peak=peak_flops(ctx.device, tr.precision, run.logging.peak_tflops),
        flops_per_token=flops_per_token(run.model, tr.seq_length,
                                        vocab_size=run.model.padded_vocab_size(ctx.tp_size),
                                        tempnet_hidden=tempnet_hidden))]
    if valid_batches is not None and run.eval.eval_iters > 0:
        callbacks.append(EvalCallback(chunks, valid_batches, ctx, run.eval, tr, logger=logger,
                                      log=log))
    return callbacks


def _deepspeed(run: RunConfig, model, ctx: ParallelContext):
    """The DeepSpeed engine path (ZeRO 1/2): its step replaces the megatron-core step, its
    checkpointer (DeepSpeed's own format, our marker and run control) the megatron-core one."""
    from functools import partial

    from megatron_tempnet.training.deepspeed import (DeepSpeedCheckpointer,
                                                     build_deepspeed_engine, deepspeed_train_step)

    engine, scheduler = build_deepspeed_engine(model, run.train, ctx,
                                               run.deepspeed.deepspeed_config,
                                               tempnet_cfg=run.tempnet)
    checkpointer = DeepSpeedCheckpointer(run.checkpoint, engine, scheduler, ctx,
                                         run_record(run.model, run.tempnet, run.train, ctx),
                                         log=log)
    return ([engine.module], engine.optimizer, scheduler,
            partial(deepspeed_train_step, engine, scheduler, tau_range=run.tempnet.tau_range),
            checkpointer)


def main(argv=None) -> int:
    start_time = time.time()
    run = parse_args(argv)
    try:
        exit_code = build(run, start_time).train().exit_code
    except TrainingDiverged as e:  # every rank raises it (RunControl's all-reduce)
        save = run.checkpoint.save
        latest = read_latest(save) if save else None
        if not dist.is_initialized() or dist.get_rank() == 0:
            log(f"{e}; " + (f"the last checkpoint, iteration {latest} in {save}, is untouched"
                            if latest is not None else "no checkpoint was saved"))
        exit_code = EXIT_CODE_DIVERGED
    shutdown()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
