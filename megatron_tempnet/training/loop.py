"""The train loop: reads like the algorithm.

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

import time
from dataclasses import dataclass, field

import torch

from megatron_tempnet.config import TrainConfig
from megatron_tempnet.parallel.runtime import ParallelContext
from megatron_tempnet.training.checkpointing import Checkpointer
from megatron_tempnet.training.run_control import RunControl
from megatron_tempnet.training.metrics_log import (Throughput, format_train_line,
                                                   tau_histogram_edges, train_metrics)
from megatron_tempnet.training.step import (REPORT_COUNTS, TAU_HISTOGRAM, StepOutput,
                                             global_metrics, reduce_reports, train_step)


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    history: list = field(default_factory=list)  # (iteration, lm loss) as logged
    metrics: list = field(default_factory=list)  # (iteration, {name: value}) as logged
    exit_code: int = 0  # nonzero: stopped early (checkpointing.EXIT_CODE_*)
    stop_reason: str | None = None


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


def log_iteration(state: TrainState, out: StepOutput, train_cfg: TrainConfig,
                  ctx: ParallelContext, window: LogWindow, log,
                  tau_range: tuple[float, float] | None = None,
                  throughput: Throughput | None = None) -> None:
    """Reduce the metrics over data-parallel ranks (the window's tau histogram in the same
    all-reduce; one host transfer), complete them into THE metrics record of this iteration
    (``metrics_log.train_metrics``: lr, ppl, grad norm, throughput over the window, MFU,
    memory, ETA), append it to ``state.metrics`` (the sinks write it as it is) and print it."""
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
    throughput = throughput or Throughput()
    record = train_metrics(metrics, lr=out.lr, grad_norm=out.grad_norm, elapsed_s=elapsed,
                           iterations=iters,
                           tokens_per_iteration=train_cfg.global_batch_size * train_cfg.seq_length,
                           flops_per_token=throughput.flops_per_token,
                           world_size=ctx.world_size, peak=throughput.peak, device=ctx.device,
                           remaining_iterations=train_cfg.train_iters - state.iteration)
    state.history.append((state.iteration, record["lm loss"]))
    state.metrics.append((state.iteration, record))
    if ctx.tp_rank == 0 and ctx.dp_rank == 0:
        log(format_train_line(state.iteration, train_cfg.train_iters, record)
            + ("" if out.update_ok else " | skipped (loss scale)"))


def train(model_chunks: list, optimizer, scheduler, batches, train_cfg: TrainConfig,
          ctx: ParallelContext, state: TrainState | None = None, log=print,
          checkpointer: Checkpointer | None = None, control: RunControl | None = None,
          callbacks=(), step=None, tau_range: tuple[float, float] | None = None,
          throughput: Throughput | None = None) -> TrainState:
    """Train until ``train_cfg.train_iters``; ``batches`` yields this DP rank's micro-batches
    (positioned at ``state.consumed_samples``). ``callbacks``: ``fn(state, StepOutput)`` after
    every iteration (evaluation, metrics sinks). ``step(batches, num_micro) -> StepOutput``
    replaces the megatron-core step (the DeepSpeed engine's). ``tau_range``: TempNetConfig's
    (tau_min, tau_max) for the tau histogram of the log lines (None, or a model without tau:
    none). ``throughput``: model FLOPs per token and the device peak for TFLOP/s and MFU.
    Raises ``TrainingDiverged``."""
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
                log_iteration(state, out, train_cfg, ctx, window, log, tau_range, throughput)
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
