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
Megatron-LM); a non-finite *loss* still stops the run (``run_control.RunControl``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from megatron_tempnet.config import TrainConfig
from megatron_tempnet.parallel.runtime import ParallelContext
from megatron_tempnet.training.checkpointing import Checkpointer
from megatron_tempnet.training.metrics_log import (Throughput, format_train_line,
                                                   tau_histogram_edges, train_metrics)
from megatron_tempnet.training.reports import LM_LOSS, REPORT_COUNTS, TAU_HISTOGRAM, ReportSpec
from megatron_tempnet.training.run_control import RunControl
from megatron_tempnet.training.step import StepOutput, global_metrics, reduce_reports

# one iteration: (this DP rank's micro-batches, micro-batches per step) -> StepOutput
# (training/step.py megatron_step, training/deepspeed.py deepspeed_train_step)
Step = Callable[[Iterator, int], StepOutput]


@dataclass
class TrainState:
    """What the loop keeps of its run. The data position is not here: the micro-batch iterator
    owns it (``TrainLoop.state_dict`` reads it from there)."""

    iteration: int = 0
    history: list = field(default_factory=list)  # (iteration, lm loss) as logged
    metrics: list = field(default_factory=list)  # (iteration, {name: value}) as logged
    exit_code: int = 0  # nonzero: stopped early (run_control.EXIT_CODE_*)
    stop_reason: str | None = None


@dataclass
class LogWindow:
    """What the loop gathers from one log line to the next: wall-clock start, iterations,
    updates skipped by the fp16 loss scaler, and this rank's sums of ``REPORT_COUNTS``
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


@dataclass
class TrainLoop:
    """One run's training: the step, the data, the state and what runs around each iteration.
    :meth:`train` is the loop; :meth:`state_dict` / :meth:`load_state_dict` are what a
    checkpoint keeps of it (the iteration, and the data position that ``batches`` owns:
    ``MicroBatchIterator.state_dict``), saved and restored through ``checkpointer``.

    ``batches`` yields this DP rank's micro-batches; ``callbacks``: ``fn(state, StepOutput)``
    after every iteration (evaluation, metrics sinks); ``spec``: the model's loss channels and
    the tau histogram (training/reports.py); ``throughput``: model FLOPs per token and the
    device peak for TFLOP/s and MFU."""

    step: Step
    batches: Iterator
    train_cfg: TrainConfig
    ctx: ParallelContext
    state: TrainState = field(default_factory=TrainState)
    checkpointer: Checkpointer | None = None
    control: RunControl | None = None
    callbacks: Sequence = ()
    spec: ReportSpec = field(default_factory=ReportSpec)
    throughput: Throughput = field(default_factory=Throughput)
    log: Callable[[str], None] = print

    def state_dict(self) -> dict:
        """The loop's own state in a checkpoint: the iteration, the data iterator's position
        and what the run control's divergence checks remember."""
        state = {"iteration": self.state.iteration, **self.batches.state_dict()}
        if self.control is not None:
            state["run_control"] = self.control.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.state.iteration = int(state["iteration"])
        self.batches.load_state_dict(state)
        if self.control is not None and state.get("run_control") is not None:
            self.control.load_state_dict(state["run_control"])  # older checkpoints: none

    def restore(self) -> None:
        """The checkpointer's ``--load`` (model, optimizer, ...) and this loop's own state."""
        if self.checkpointer is not None:
            self.load_state_dict(self.checkpointer.load())

    def train(self, callbacks: Sequence = ()) -> TrainState:
        """Train until ``train_cfg.train_iters``. Raises ``TrainingDiverged``."""
        state, cfg, ctx = self.state, self.train_cfg, self.ctx
        control = self.control or RunControl(device=ctx.device, losses=self.spec.losses)
        num_micro = cfg.num_microbatches(ctx.dp_size)
        window = LogWindow()
        with control:
            while state.iteration < cfg.train_iters:
                out = self.step(self.batches, num_micro)
                state.iteration += 1
                window.add(out)
                stop = control.check(state.iteration, out.reports, out.grad_norm)
                last = stop is not None or state.iteration == cfg.train_iters
                if state.iteration % cfg.log_interval == 0 or last:
                    self.log_iteration(out, window)
                    window = LogWindow()
                for callback in (*self.callbacks, *callbacks):  # after logging
                    callback(state, out)
                if self.checkpointer is not None and self.checkpointer.due(state.iteration,
                                                                           stopping=last):
                    self.checkpointer.save(self.state_dict())
                if stop is not None:
                    state.exit_code, state.stop_reason = stop.exit_code, stop.message
                    if ctx.rank == 0:
                        self.log(stop.message)
                    break
        return state

    def log_iteration(self, out: StepOutput, window: LogWindow) -> None:
        """Reduce the metrics over data-parallel ranks (the window's tau histogram in the same
        all-reduce; one host transfer), complete them into THE metrics record of this
        iteration (``metrics_log.train_metrics``: lr, ppl, grad norm, throughput over the
        window, MFU, memory, ETA), append it to ``state.metrics`` (the sinks write it as it is)
        and print it."""
        state, cfg, ctx, spec = self.state, self.train_cfg, self.ctx, self.spec
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
        if counts is not None and spec.tau_bounds is not None:
            metrics[TAU_HISTOGRAM] = {"edges": tau_histogram_edges(*spec.tau_bounds,
                                                                   len(counts)),
                                      "counts": counts}
        if out.loss_scale is not None:
            metrics["skipped iterations"] = window.skipped
        tp = self.throughput
        record = train_metrics(metrics, lr=out.lr, grad_norm=out.grad_norm, elapsed_s=elapsed,
                               iterations=iters,
                               tokens_per_iteration=cfg.global_batch_size * cfg.seq_length,
                               flops_per_token=tp.flops_per_token, world_size=ctx.world_size,
                               peak=tp.peak, device=ctx.device,
                               remaining_iterations=cfg.train_iters - state.iteration)
        state.history.append((state.iteration, record[LM_LOSS]))
        state.metrics.append((state.iteration, record))
        if ctx.tp_rank == 0 and ctx.dp_rank == 0:
            self.log(format_train_line(state.iteration, cfg.train_iters, record)
                     + ("" if out.update_ok else " | skipped (loss scale)"))
