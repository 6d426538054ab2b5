"""The train loop: reads like the algorithm (style.md practice 1).

    for each iteration:
        micro-batches of this data-parallel rank -> pipeline schedule (forward + backward)
        -> DDP gradient reduction (in finalize_model_grads) -> optimizer step -> lr step
        -> report loss and throughput
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from megatron_tempnet.config import TrainConfig
from megatron_tempnet.parallel.runtime import ParallelContext
from megatron_tempnet.training.step import forward_backward, global_metrics


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    history: list = field(default_factory=list)  # (iteration, lm loss) as logged
    metrics: list = field(default_factory=list)  # (iteration, {name: value}) as logged


def global_mean_loss(reports: list, ctx: ParallelContext) -> torch.Tensor | None:
    """Token-weighted mean plain CE over the global batch (last stage; None elsewhere)."""
    return global_metrics(reports, ctx.dp_group)["lm loss"] if ctx.is_last_stage else None


def format_metrics(m: dict) -> str:
    """"lm loss" (plain CE, tau = 1) and its perplexity; with the DRO loss also the DRO loss,
    the tempered CE (perplexity at the model's own tau) and tau mean/min/max (tempnet.md 1)."""
    line = f"lm loss {m['lm loss']:.4f} | ppl {math.exp(min(m['lm loss'], 30)):.2f}"
    if "dro loss" in m:
        line += (f" | dro loss {m['dro loss']:.4f} | tempered ce {m['tempered ce']:.4f} | "
                 f"tau {m['tau']:.3f} [{m['tau min']:.3f}, {m['tau max']:.3f}]")
    return line


def train(model_chunks: list, optimizer, scheduler, batches, train_cfg: TrainConfig,
          ctx: ParallelContext, state: TrainState | None = None, log=print) -> TrainState:
    """Train until ``train_cfg.train_iters``; ``batches`` yields this DP rank's micro-batches."""
    state = state or TrainState()
    num_micro = train_cfg.num_microbatches(ctx.dp_size)
    tokens_per_iter = train_cfg.global_batch_size * train_cfg.seq_length
    window_start, window_iters = time.perf_counter(), 0
    while state.iteration < train_cfg.train_iters:
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(model_chunks, batches, num_microbatches=num_micro,
                                   seq_length=train_cfg.seq_length,
                                   micro_batch_size=train_cfg.micro_batch_size)
        update_ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        state.iteration += 1
        state.consumed_samples += train_cfg.global_batch_size
        window_iters += 1

        if state.iteration % train_cfg.log_interval == 0 or state.iteration == train_cfg.train_iters:
            elapsed = time.perf_counter() - window_start
            if ctx.is_last_stage:
                metrics = {k: v.item() for k, v in global_metrics(reports, ctx.dp_group).items()}
                state.history.append((state.iteration, metrics["lm loss"]))
                state.metrics.append((state.iteration, metrics))
            if ctx.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0:
                log(f"iteration {state.iteration:6d}/{train_cfg.train_iters} | "
                    f"lr {scheduler.get_lr(optimizer.param_groups[0]):.3e} | "
                    f"{format_metrics(metrics)} | grad norm {grad_norm or 0.0:.3f} | "
                    f"tokens/s {tokens_per_iter * window_iters / elapsed:,.0f} | "
                    f"{1000 * elapsed / window_iters:.1f} ms/iter"
                    + ("" if update_ok else " | skipped (loss scale)"))
            window_start, window_iters = time.perf_counter(), 0
    return state
