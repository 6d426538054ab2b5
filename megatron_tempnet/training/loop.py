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
import torch.distributed as dist

from megatron_tempnet.config import TrainConfig
from megatron_tempnet.parallel.runtime import ParallelContext
from megatron_tempnet.training.step import forward_backward, reduce_reports


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    history: list = field(default_factory=list)  # (iteration, loss) as logged


def global_mean_loss(reports: list, ctx: ParallelContext) -> torch.Tensor | None:
    """Token-weighted mean loss over the global batch (on the last stage; None elsewhere)."""
    if not ctx.is_last_stage:
        return None
    totals = reduce_reports(reports)
    dist.all_reduce(totals, group=ctx.dp_group)
    return totals[0] / totals[1].clamp(min=1)


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

        loss = global_mean_loss(reports, ctx)
        if state.iteration % train_cfg.log_interval == 0 or state.iteration == train_cfg.train_iters:
            elapsed = time.perf_counter() - window_start
            if loss is not None and ctx.tp_rank == 0 and ctx.dp_rank == 0:
                value = loss.item()
                state.history.append((state.iteration, value))
                log(f"iteration {state.iteration:6d}/{train_cfg.train_iters} | "
                    f"lr {scheduler.get_lr(optimizer.param_groups[0]):.3e} | "
                    f"lm loss {value:.4f} | ppl {math.exp(min(value, 30)):.2f} | "
                    f"grad norm {grad_norm or 0.0:.3f} | "
                    f"tokens/s {tokens_per_iter * window_iters / elapsed:,.0f} | "
                    f"{1000 * elapsed / window_iters:.1f} ms/iter"
                    + ("" if update_ok else " | skipped (loss scale)"))
            window_start, window_iters = time.perf_counter(), 0
    return state
