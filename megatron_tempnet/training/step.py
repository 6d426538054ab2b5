"""One forward/backward over the micro-batches of a global batch, through megatron-core's schedules.

Batches are dicts with ``tokens``, ``labels``, ``position_ids`` ([b, s] int64) and ``loss_mask``
([b, s] float). The loss is the loss-mask weighted token mean over the whole global batch:
each micro-batch returns its loss *sum* and token count, and megatron-core's
``finalize_model_grads`` divides the gradients by the global token count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_tempnet.training.metrics_log import tau_histogram
from megatron_tempnet.training.reports import (LM_LOSS, REPORT_COUNTS, TAU_HISTOGRAM,
                                               TAU_MOMENTS, ReportSpec)

__all__ = ["REPORT_COUNTS", "TAU_HISTOGRAM", "TAU_MOMENTS", "ReportSpec", "StepOutput",
           "forward_backward", "global_metrics", "masked_sum_loss", "megatron_step",
           "reduce_reports", "train_step"]


def tau_moments(tau: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[sum w, sum w tau, sum w tau^2] (float64: the variance of a nearly constant tau survives
    the subtraction) of the per-token tau [t] with the loss-mask weights w [t]."""
    w = torch.where(mask != 0, mask, torch.zeros_like(mask)).double()
    t = torch.where(mask != 0, tau, torch.zeros_like(tau)).double()
    return torch.stack([w.sum(), (w * t).sum(), (w * t * t).sum()])


def masked_sum_loss(loss_mask: torch.Tensor, output: torch.Tensor,
                    spec: ReportSpec | None = None):
    """megatron-core loss_func contract: (loss sum, token count, values to report).

    ``output`` is the model's per-token output: [b, s] (plain GPTModel: CE) or [b, s, K] with
    the K channels ``spec.channels`` names (``training/reports.py``; only "loss" carries
    gradient: its sum is the returned loss), each reported under its name. loss_mask [b, s]: a 0
    drops the token from
    every sum. With ``spec.tau_bounds`` the reports add "tau histogram": the loss-mask weighted
    counts [spec.histogram_bins] (float64) of tau over those bounds, which sum to the token count
    (device ops only: no host sync).
    """
    spec = spec or ReportSpec()
    mask = loss_mask.reshape(-1).float()  # [t]
    per_token = output.reshape(mask.numel(), -1).float()  # [t, K]
    keep = (mask != 0).unsqueeze(-1)
    weighted = torch.where(keep, per_token * mask.unsqueeze(-1), torch.zeros_like(per_token))
    sums = weighted.sum(0)  # [K]; the "loss" channel's differentiable
    count = mask.sum()
    num_tokens = count.to(torch.int)

    def pair(value):
        return torch.stack([value.detach(), count])

    if not spec.channels and per_token.shape[1] == 1:  # plain CE [b, s]: the loss is the CE
        return sums[0], num_tokens, {LM_LOSS: pair(sums[0])}
    if per_token.shape[1] != len(spec.channels):
        raise ValueError(f"the model returned {per_token.shape[1]} per-token channels, the report "
                         f"spec names {len(spec.channels)} ({spec.channels}): build the spec "
                         "from the model's loss channels (training.stage.report_spec)")
    channel = {name: i for i, name in enumerate(spec.channels)}
    reports = {spec.report_name(name): pair(sums[i]) for name, i in channel.items()}
    if spec.has_tau:
        tau, kept = per_token[:, channel["tau"]].detach(), keep[:, 0]  # masked min/max: [1] each
        reports[TAU_MOMENTS] = tau_moments(tau, mask)
        reports["tau min"] = torch.where(kept, tau, torch.full_like(tau, math.inf)).amin(0, True)
        reports["tau max"] = torch.where(kept, tau, torch.full_like(tau, -math.inf)).amax(0, True)
        if spec.tau_bounds is not None:
            reports[TAU_HISTOGRAM] = tau_histogram(tau, mask, *spec.tau_bounds,
                                                   bins=spec.histogram_bins)
    return sums[channel.get("loss", 0)], num_tokens, reports


def forward_step(data_iterator, model, *, spec: ReportSpec | None = None):
    """megatron-core forward_step_func: the model returns per-token losses [b, s] or [b, s, K].

    The loss mask goes to the model too: ``--dro-loss-impl fused_linear`` forms its gradients in
    the forward for the loss-mask weighted sum that ``masked_sum_loss`` takes. ``spec``: what
    the model's channels are (see ``masked_sum_loss``)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, partial(masked_sum_loss, batch["loss_mask"], spec=spec)


def forward_backward(model_chunks: list, data_iterator, *, num_microbatches: int,
                     seq_length: int, micro_batch_size: int, forward_only: bool = False,
                     spec: ReportSpec | None = None):
    """Run the pipeline schedule; returns the last stage's per-micro-batch reports (named by
    ``spec``, see ``masked_sum_loss``)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    schedule = get_forward_backward_func()
    return schedule(forward_step_func=partial(forward_step, spec=spec),
                    data_iterator=chunk_iterators(model_chunks, data_iterator,
                                                  num_microbatches),
                    model=model_chunks, num_microbatches=num_microbatches,
                    seq_length=seq_length, micro_batch_size=micro_batch_size,
                    forward_only=forward_only)


def chunk_iterators(model_chunks: list, data_iterator, num_microbatches: int):
    """The schedule's data iterator(s): ``data_iterator`` itself for one model chunk; with the
    interleaved pipeline one iterator per chunk over the same ``num_microbatches`` micro-batches
    (read once from ``data_iterator``: every chunk runs each micro-batch in turn)."""
    if len(model_chunks) == 1:
        return data_iterator
    micro = [next(data_iterator) for _ in range(num_microbatches)]
    return [iter(micro) for _ in model_chunks]


def reduce_reports(reports: list, key: str = LM_LOSS) -> torch.Tensor:
    """One report combined over micro-batches (of this data-parallel rank) by its
    ``ReportSpec.reduction``: [sum, count] pairs and counts summed, [min] / [max] extremes."""
    if not reports:
        return torch.zeros(2)
    stacked = torch.stack([r[key] for r in reports])
    op = ReportSpec.reduction(key)
    return stacked.amin(0) if op == "min" else stacked.amax(0) if op == "max" else stacked.sum(0)


def global_metrics(reports: list, dp_group, window: dict | None = None) -> dict:
    """Token-weighted means (and tau min/max/std, and the tau histogram's counts [bins]) over the
    global batch, from the last stage's micro-batch reports; reduced over ``dp_group`` (None:
    this process only) in two all-reduces whatever the keys: one SUM of every sum and count
    packed into one float64 vector, one MAX of the extremes (the minima negated).

    ``window``: name -> this rank's sums over more than this iteration (the loop's tau histogram
    over its log window); they replace the reports' own and ride in the same SUM.
    """
    local = {key: reduce_reports(reports, key) for key in (reports[0] if reports else
                                                           [LM_LOSS])}
    local.update(window or {})
    if dp_group is not None:
        extreme = [k for k in local if ReportSpec.reduction(k) in ("min", "max")]
        _all_reduce_packed(local, [k for k in local if k not in extreme], dist.ReduceOp.SUM,
                           dp_group)
        _all_reduce_packed(local, extreme, dist.ReduceOp.MAX, dp_group)
    metrics = {}
    for key, value in local.items():
        if key == TAU_MOMENTS:  # the per-token spread of tau: std over the batch's tokens
            weight, first, second = value.unbind()
            mean = first / weight.clamp(min=1e-30)
            metrics["tau std"] = (second / weight.clamp(min=1e-30) - mean * mean).clamp_min(
                0).sqrt()
            continue
        op = ReportSpec.reduction(key)
        metrics[key] = (value[0] if op in ("min", "max") else value if op == "sum"
                        else value[0] / value[1].clamp(min=1))
    return metrics


def _all_reduce_packed(values: dict, keys: list, op, group) -> None:
    """All-reduce ``values[k]`` for every k in ``keys`` as ONE float64 vector, in place (each
    keeps its dtype and shape); MAX serves the minima too (negated)."""
    if not keys:
        return
    signs = [-1.0 if ReportSpec.reduction(k) == "min" else 1.0 for k in keys]
    flat = torch.cat([s * values[k].double().reshape(-1) for s, k in zip(signs, keys)])
    dist.all_reduce(flat, op=op, group=group)
    for s, k, part in zip(signs, keys, flat.split([values[k].numel() for k in keys])):
        values[k] = (s * part).to(values[k].dtype).reshape(values[k].shape)


# --- the step contract: what one iteration produces, whoever runs it -----------------------------

@dataclass
class StepOutput:
    """What one iteration produced (the megatron-core step below, or the DeepSpeed engine's in
    training/deepspeed.py); the loop and its callbacks receive it."""

    reports: list  # the last stage's per-micro-batch reports; [] elsewhere
    grad_norm: float | None
    update_ok: bool
    lr: float  # the LM's lr after the scheduler step (as logged)
    loss_scale: object = None  # fp16: the loss scaler's scale after the step (a [1] tensor)


def train_step(model_chunks: list, optimizer, scheduler, batches, train_cfg, num_micro: int,
               spec: ReportSpec | None = None) -> StepOutput:
    """One iteration through megatron-core; the lr schedule advances only when the optimizer
    updated (fp16: the loss scaler skips the update on a gradient overflow, as in Megatron-LM).
    ``spec``: the model's loss channels and the tau histogram (``masked_sum_loss``)."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = forward_backward(model_chunks, batches, num_microbatches=num_micro,
                               seq_length=train_cfg.seq_length,
                               micro_batch_size=train_cfg.micro_batch_size, spec=spec)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=1)
    return StepOutput(reports, grad_norm, update_ok, scheduler.get_lr(optimizer.param_groups[0]),
                      optimizer.get_loss_scale() if train_cfg.precision == "fp16" else None)


def megatron_step(model_chunks: list, optimizer, scheduler, train_cfg,
                  spec: ReportSpec | None = None):
    """The loop's step (training/loop.py ``Step``) on the megatron-core path."""
    def step(batches, num_micro: int) -> StepOutput:
        return train_step(model_chunks, optimizer, scheduler, batches, train_cfg, num_micro, spec)
    return step
