"""The train loop: reads like the algorithm (style.md practice 1).

    for each iteration:
        micro-batches of this data-parallel rank -> pipeline schedule (forward + backward)
        -> DDP gradient reduction (in finalize_model_grads) -> optimizer step -> lr step
        -> all ranks agree: diverged? (raise) signal / time limit? (save, stop)
        -> report loss and throughput -> callbacks (metrics sinks, evaluation)
        -> checkpoint every --save-interval iterations, at the end, and before stopping early

A log line reports the logged iteration's global batch (reduced over data-parallel ranks only
then), plus what the loop gathered over its log window (:class:`LogWindow`): throughput, the tau
histogram's counts (every iteration's, on the device, reduced in the same all-reduce as the
line's sums) and, in fp16, the loss scale and the updates the loss scaler skipped. A skipped
update (fp16 gradient overflow: megatron-core's dynamic loss scaler backs off) is no divergence:
the optimizer reports no grad norm, the loss is finite, and the lr schedule waits (as in
Megatron-LM); a non-finite *loss* still stops the run (``checkpointing.RunControl``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from megatron_tempnet.config import TrainConfig
from megatron_tempnet.parallel.runtime import ParallelContext
from megatron_tempnet.training.checkpointing import Checkpointer, RunControl
from megatron_tempnet.training.metrics_log import tau_histogram_edges
from megatron_tempnet.training.step import (REPORT_COUNTS, TAU_HISTOGRAM, forward_backward,
                                             global_metrics, reduce_reports)


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
    loss_scale: object = None  # fp16: the loss scaler's scale after the step (a [1] tensor)


@dataclass
class LogWindow:
    """What the loop gathers from one log line to the next: wall-clock start, iterations,
    updates skipped by the fp16 loss scaler, and this rank's sums of ``step.REPORT_COUNTS``
    over every iteration (the tau histogram; tensors on the device: no host sync per step)."""

    start: float = field(default_factory=time.perf_counter)
    iterations: int = 0
    skipped: int = 0
    sums: dict = field(default_factory=dict)

    def add(self, out: StepOutput) -> None:
        self.iterations += 1
        self.skipped += not out.update_ok
        for key in REPORT_COUNTS:
            if out.reports and key in out.reports[0]:
                value = reduce_reports(out.reports, key)
                self.sums[key] = self.sums[key] + value if key in self.sums else value


def format_metrics(m: dict) -> str:
    """"lm loss" (plain CE, tau = 1) and its perplexity; with the DRO loss also the DRO loss,
    the tempered CE (perplexity at the model's own tau) and tau mean ± std over the tokens
    [min, max] (tempnet.md 1)."""
    line = f"lm loss {m['lm loss']:.4f} | ppl {math.exp(min(m['lm loss'], 30)):.2f}"
    if "dro loss" in m:
        line += (f" | dro loss {m['dro loss']:.4f} | tempered ce {m['tempered ce']:.4f} | "
                 f"tau {m['tau']:.3f} ± {m['tau std']:.3f} [{m['tau min']:.3f}, "
                 f"{m['tau max']:.3f}]")
    return line


def train_step(model_chunks: list, optimizer, scheduler, batches, train_cfg: TrainConfig,
               num_micro: int, tau_range: tuple[float, float] | None = None) -> StepOutput:
    """One iteration through megatron-core; the lr schedule advances only when the optimizer
    updated (fp16: the loss scaler skips the update on a gradient overflow, as in Megatron-LM).
    ``tau_range``: the tau histogram's bounds (``step.masked_sum_loss``; None: none)."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = forward_backward(model_chunks, batches, num_microbatches=num_micro,
                               seq_length=train_cfg.seq_length,
                               micro_batch_size=train_cfg.micro_batch_size, tau_range=tau_range)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=1)
    return StepOutput(reports, grad_norm, update_ok, scheduler.get_lr(optimizer.param_groups[0]),
                      optimizer.get_loss_scale() if train_cfg.precision == "fp16" else None)


def log_iteration(state: TrainState, out: StepOutput, train_cfg: TrainConfig,
                  ctx: ParallelContext, window: LogWindow, log,
                  tau_range: tuple[float, float] | None = None) -> None:
    """Reduce the metrics over data-parallel ranks (the window's tau histogram in the same
    all-reduce), record them, print one line. One host transfer for all of them."""
    elapsed, iters = time.perf_counter() - window.start, window.iterations
    if not ctx.is_last_stage:
        return
    reduced = global_metrics(out.reports, ctx.dp_group, window.sums)
    if out.loss_scale is not None:
        reduced["loss scale"] = out.loss_scale.reshape(())
    flat = torch.cat([v.detach().double().reshape(-1) for v in reduced.values()]).tolist()
    metrics, at = {}, 0
    for key, value in reduced.items():
        part, at = flat[at:at + value.numel()], at + value.numel()
        metrics[key] = part if key in REPORT_COUNTS else part[0]
    counts = metrics.pop(TAU_HISTOGRAM, None)
    if counts is not None and tau_range is not None:
        metrics[TAU_HISTOGRAM] = {"edges": tau_histogram_edges(*tau_range, len(counts)),
                                  "counts": counts}
    if out.loss_scale is not None:
        metrics["skipped iterations"] = window.skipped
    state.history.append((state.iteration, metrics["lm loss"]))
    state.metrics.append((state.iteration, metrics))
    if ctx.tp_rank == 0 and ctx.dp_rank == 0:
        tokens = train_cfg.global_batch_size * train_cfg.seq_length * iters
        scaler = ("" if out.loss_scale is None else
                  f" | loss scale {metrics['loss scale']:.1f} | skipped {window.skipped}")
        log(f"iteration {state.iteration:6d}/{train_cfg.train_iters} | lr {out.lr:.3e} | "
            f"{format_metrics(metrics)} | grad norm {out.grad_norm or 0.0:.3f} | "
            f"tokens/s {tokens / elapsed:,.0f} | {1000 * elapsed / iters:.1f} ms/iter" + scaler
            + ("" if out.update_ok else " | skipped (loss scale)"))


def train(model_chunks: list, optimizer, scheduler, batches, train_cfg: TrainConfig,
          ctx: ParallelContext, state: TrainState | None = None, log=print,
          checkpointer: Checkpointer | None = None, control: RunControl | None = None,
          callbacks=(), step=None, tau_range: tuple[float, float] | None = None) -> TrainState:
    """Train until ``train_cfg.train_iters``; ``batches`` yields this DP rank's micro-batches
    (positioned at ``state.consumed_samples``). ``callbacks``: ``fn(state, StepOutput)`` after
    every iteration (evaluation, metrics sinks). ``step(batches, num_micro) -> StepOutput``
    replaces the megatron-core step (the DeepSpeed engine's). ``tau_range``: TempNetConfig's
    (tau_min, tau_max) for the tau histogram of the log lines (None, or a model without tau:
    none). Raises ``TrainingDiverged``."""
    state = state or TrainState()
    step = step or (lambda batches, num_micro: train_step(
        model_chunks, optimizer, scheduler, batches, train_cfg, num_micro, tau_range))
    control = control or RunControl(device=ctx.device)
    num_micro = train_cfg.num_microbatches(ctx.dp_size)
    window = LogWindow()
    with control:
        while state.iteration < train_cfg.train_iters:
            out = step(batches, num_micro)
            state.iteration += 1
            state.consumed_samples += train_cfg.global_batch_size
            window.add(out)
            stop = control.check(state.iteration, out.reports, out.grad_norm)
            last = stop is not None or state.iteration == train_cfg.train_iters
            if state.iteration % train_cfg.log_interval == 0 or last:
                log_iteration(state, out, train_cfg, ctx, window, log, tau_range)
                window = LogWindow()
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
