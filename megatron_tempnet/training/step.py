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

from megatron_tempnet.models.tempnet_gpt import LOSS_CHANNELS
from megatron_tempnet.training.metrics_log import tau_histogram

# Reports of one micro-batch (last stage): name -> [sum, token count], except the masked
# extremes, name -> [value] reduced with min / max (over micro-batches and data-parallel ranks),
# and the counts, name -> [bins] summed as they are (the tau histogram).
# "lm loss" is always the plain CE (tau = 1), so that it stays comparable across loss modes.
REPORT_EXTREMES = {"tau min": "min", "tau max": "max"}
# The report of each per-token channel a TempNet / DRO model returns (models/tempnet_gpt.py
# LOSS_CHANNELS; channel "loss" carries the gradient)
CHANNEL_REPORTS = {"loss": "dro loss", "ce": "lm loss", "tempered_ce": "tempered ce",
                   "tau": "tau"}
TAU_HISTOGRAM = "tau histogram"
TAU_HISTOGRAM_BINS = 32  # equal-width bins over [tau_min, tau_max]; outliers in the edge bins
REPORT_COUNTS = (TAU_HISTOGRAM,)
# [sum w, sum w tau, sum w tau^2] in float64 (summed like a [sum, count] pair); global_metrics
# turns it into "tau std", the spread of tau over the batch's tokens
TAU_MOMENTS = "tau moments"


def tau_moments(tau: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[sum w, sum w tau, sum w tau^2] (float64: the variance of a nearly constant tau survives
    the subtraction) of the per-token tau [t] with the loss-mask weights w [t]."""
    w = torch.where(mask != 0, mask, torch.zeros_like(mask)).double()
    t = torch.where(mask != 0, tau, torch.zeros_like(tau)).double()
    return torch.stack([w.sum(), (w * t).sum(), (w * t * t).sum()])


def masked_sum_loss(loss_mask: torch.Tensor, output: torch.Tensor,
                    tau_range: tuple[float, float] | None = None):
    """megatron-core loss_func contract: (loss sum, token count, values to report).

    ``output`` is the model's per-token output: [b, s] (plain GPTModel: CE) or [b, s, K] with
    the channels the model declares, ``models.tempnet_gpt.LOSS_CHANNELS`` (loss, ce,
    tempered_ce, tau; only channel 0, "loss", carries gradient), reported by name
    (``CHANNEL_REPORTS``). loss_mask [b, s]: a 0 drops the token from every sum.
    ``tau_range`` (TempNetConfig's (tau_min, tau_max); None: none) adds "tau histogram": the
    loss-mask weighted counts [TAU_HISTOGRAM_BINS] (float64) of tau over those bounds, which sum
    to the token count (device ops only: no host sync).
    """
    mask = loss_mask.reshape(-1).float()  # [t]
    per_token = output.reshape(mask.numel(), -1).float()  # [t, K]
    keep = (mask != 0).unsqueeze(-1)
    weighted = torch.where(keep, per_token * mask.unsqueeze(-1), torch.zeros_like(per_token))
    sums = weighted.sum(0)  # [K]; sums[0] differentiable
    count = mask.sum()
    num_tokens = count.to(torch.int)

    def pair(value):
        return torch.stack([value.detach(), count])

    if per_token.shape[1] == 1:  # plain CE: the loss is the CE
        return sums[0], num_tokens, {"lm loss": pair(sums[0])}
    channel = dict(zip(LOSS_CHANNELS, range(len(LOSS_CHANNELS))))  # the model's named channels
    tau, kept = per_token[:, channel["tau"]].detach(), keep[:, 0]  # masked min / max: [1] each
    reports = {CHANNEL_REPORTS[name]: pair(sums[i]) for name, i in channel.items()}
    reports[TAU_MOMENTS] = tau_moments(tau, mask)
    reports["tau min"] = torch.where(kept, tau, torch.full_like(tau, math.inf)).amin(0, True)
    reports["tau max"] = torch.where(kept, tau, torch.full_like(tau, -math.inf)).amax(0, True)
    if tau_range is not None:
        reports[TAU_HISTOGRAM] = tau_histogram(tau, mask, *tau_range, bins=TAU_HISTOGRAM_BINS)
    return sums[0], num_tokens, reports


def forward_step(data_iterator, model, *, tau_range: tuple[float, float] | None = None):
    """megatron-core forward_step_func: the model returns per-token losses [b, s] or [b, s, K].

    The loss mask goes to the model too: ``--dro-loss-impl fused_linear`` forms its gradients in
    the forward for the loss-mask weighted sum that ``masked_sum_loss`` takes. ``tau_range``:
    see ``masked_sum_loss``."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, partial(masked_sum_loss, batch["loss_mask"], tau_range=tau_range)


def forward_backward(model_chunks: list, data_iterator, *, num_microbatches: int,
                     seq_length: int, micro_batch_size: int, forward_only: bool = False,
                     tau_range: tuple[float, float] | None = None):
    """Run the pipeline schedule; returns the last stage's per-micro-batch reports (with the
    tau histogram over ``tau_range`` when set, see ``masked_sum_loss``)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    schedule = get_forward_backward_func()
    return schedule(forward_step_func=partial(forward_step, tau_range=tau_range),
                    data_iterator=data_iterator,
                    model=model_chunks, num_microbatches=num_microbatches,
                    seq_length=seq_length, micro_batch_size=micro_batch_size,
                    forward_only=forward_only)


def reduce_reports(reports: list, key: str = "lm loss") -> torch.Tensor:
    """One report summed over micro-batches (of this data-parallel rank): [sum, count], [min] /
    [max] for the keys of ``REPORT_EXTREMES``, or the summed counts of ``REPORT_COUNTS``."""
    if not reports:
        return torch.zeros(2)
    stacked = torch.stack([r[key] for r in reports])
    op = REPORT_EXTREMES.get(key)
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
                                                           ["lm loss"])}
    local.update(window or {})
    if dp_group is not None:
        _all_reduce_packed(local, [k for k in local if k not in REPORT_EXTREMES],
                           dist.ReduceOp.SUM, dp_group)
        _all_reduce_packed(local, [k for k in local if k in REPORT_EXTREMES],
                           dist.ReduceOp.MAX, dp_group)
    metrics = {}
    for key, value in local.items():
        if key == TAU_MOMENTS:  # the per-token spread of tau: std over the batch's tokens
            weight, first, second = value.unbind()
            mean = first / weight.clamp(min=1e-30)
            metrics["tau std"] = (second / weight.clamp(min=1e-30) - mean * mean).clamp_min(
                0).sqrt()
            continue
        metrics[key] = (value[0] if key in REPORT_EXTREMES else value if key in REPORT_COUNTS
                        else value[0] / value[1].clamp(min=1))
    return metrics


def _all_reduce_packed(values: dict, keys: list, op, group) -> None:
    """All-reduce ``values[k]`` for every k in ``keys`` as ONE float64 vector, in place (each
    keeps its dtype and shape); MAX serves the minima of ``REPORT_EXTREMES`` too (negated)."""
    if not keys:
        return
    signs = [-1.0 if REPORT_EXTREMES.get(k) == "min" else 1.0 for k in keys]
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
               tau_range: tuple[float, float] | None = None) -> StepOutput:
    """One iteration through megatron-core; the lr schedule advances only when the optimizer
    updated (fp16: the loss scaler skips the update on a gradient overflow, as in Megatron-LM).
    ``tau_range``: the tau histogram's bounds (``masked_sum_loss``; None: none)."""
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
