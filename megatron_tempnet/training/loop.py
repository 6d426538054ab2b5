"""The train loop: reads like the algorithm (style.md practice 1).

    for each iteration:
        micro-batches of this data-parallel rank -> pipeline schedule (forward + backward)
        -> DDP gradient reduction (in finalize_model_grads) -> optimizer step -> lr step
        -> all ranks agree: diverged? (raise) signal / time limit? (save, stop)
        -> report loss and throughput -> callbacks (metrics sinks, evaluation)
        -> checkpoint every --save-interval iterations, at the end, and before stopping early
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from megatron_tempnet.config import TrainConfig
from megatron_tempnet.parallel.runtime import ParallelContext
from megatron_tempnet.training.checkpointing import Checkpointer, RunControl
from megatron_tempnet.training.step import forward_backward, global_metrics


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    history: list = field(default_factory=list)  # (iteration, lm loss) as logged
    metrics: list = field(default_factory=list)  # (iteration, {name: value}) as logged
    exit_code: int = 0  # nonzero: stopped early (checkpointing.EXIT_CODE_*)
    stop_reason: str | None = None


@dataclass
class StepOutput:
    """What one iteration produced; callbacks receive it with the TrainState."""

    reports: list  # the last stage's per-micro-batch reports (training.step); [] elsewhere
    grad_norm: float | None
    update_ok: bool
    lr: float  # the LM's lr after the scheduler step (as logged)


def format_metrics(m: dict) -> str:
    """"lm loss" (plain CE, tau = 1) and its perplexity; with the DRO loss also the DRO loss,
    the tempered CE (perplexity at the model's own tau) and tau mean/min/max (tempnet.md 1)."""
    line = f"lm loss {m['lm loss']:.4f} | ppl {math.exp(min(m['lm loss'], 30)):.2f}"
    if "dro loss" in m:
        line += (f" | dro loss {m['dro loss']:.4f} | tempered ce {m['tempered ce']:.4f} | "
                 f"tau {m['tau']:.3f} [{m['tau min']:.3f}, {m['tau max']:.3f}]")
    return line


def train_step(model_chunks: list, optimizer, scheduler, batches, train_cfg: TrainConfig,
               num_micro: int) -> StepOutput:
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = forward_backward(model_chunks, batches, num_microbatches=num_micro,
                               seq_length=train_cfg.seq_length,
                               micro_batch_size=train_cfg.micro_batch_size)
    update_ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    return StepOutput(reports, grad_norm, update_ok, scheduler.get_lr(optimizer.param_groups[0]))


def log_iteration(state: TrainState, out: StepOutput, train_cfg: TrainConfig,
                  ctx: ParallelContext, window: tuple[float, int], log) -> None:
    """Reduce the metrics over data-parallel ranks, record them, print one line."""
    elapsed, iters = time.perf_counter() - window[0], window[1]
    if not ctx.is_last_stage:
        return
    metrics = {k: v.item() for k, v in global_metrics(out.reports, ctx.dp_group).items()}
    state.history.append((state.iteration, metrics["lm loss"]))
    state.metrics.append((state.iteration, metrics))
    if ctx.tp_rank == 0 and ctx.dp_rank == 0:
        tokens = train_cfg.global_batch_size * train_cfg.seq_length * iters
        log(f"iteration {state.iteration:6d}/{train_cfg.train_iters} | lr {out.lr:.3e} | "
            f"{format_metrics(metrics)} | grad norm {out.grad_norm or 0.0:.3f} | "
            f"tokens/s {tokens / elapsed:,.0f} | {1000 * elapsed / iters:.1f} ms/iter"
            + ("" if out.update_ok else " | skipped (loss scale)"))


def train(model_chunks: list, optimizer, scheduler, batches, train_cfg: TrainConfig,
          ctx: ParallelContext, state: TrainState | None = None, log=print,
          checkpointer: Checkpointer | None = None, control: RunControl | None = None,
          callbacks=(), step=None) -> TrainState:
    """Train until ``train_cfg.train_iters``; ``batches`` yields this DP rank's micro-batches
    (positioned at ``state.consumed_samples``). ``callbacks``: ``fn(state, StepOutput)`` after
    every iteration (evaluation, metrics sinks). ``step(batches, num_micro) -> StepOutput``
    replaces the megatron-core step (the DeepSpeed engine's). Raises ``TrainingDiverged``."""
    state = state or TrainState()
    step = step or (lambda batches, num_micro: train_step(
        model_chunks, optimizer, scheduler, batches, train_cfg, num_micro))
    control = control or RunControl(device=ctx.device)
    num_micro = train_cfg.num_microbatches(ctx.dp_size)
    window = (time.perf_counter(), 0)
    with control:
        while state.iteration < train_cfg.train_iters:
            out = step(batches, num_micro)
            state.iteration += 1
            state.consumed_samples += train_cfg.global_batch_size
            window = (window[0], window[1] + 1)
            stop = control.check(state.iteration, out.reports, out.grad_norm)
            last = stop is not None or state.iteration == train_cfg.train_iters
            if state.iteration % train_cfg.log_interval == 0 or last:
                log_iteration(state, out, train_cfg, ctx, window, log)
                window = (time.perf_counter(), 0)
            for callback in callbacks:  # after logging: state.metrics holds this iteration's
                callback(state, out)
            if checkpointer is not None and checkpointer.due(state.iteration, stopping=last):
                checkpointer.save(state.iteration, state.consumed_samples)
            if stop is not None:
                state.exit_code, state.stop_reason = stop.exit_code, stop.message
                if ctx.rank == 0:
                    log(stop.message)
                break
    return state
