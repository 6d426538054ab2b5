"""Dense single-process PyTorch references of TempNet and the DRO loss: the test oracles.

These follow docs/tempnet_math.md sections 1-2 literally on the FULL [..., V] logits with plain
autograd, so they are independent of the vocab-parallel implementations in ``head.py`` /
``loss.py`` (and of the fused kernels, which must match them). Any float dtype works; float64
gives the tightest oracle. Computation happens in ``promote(dtype, float32)``.

API, mirrored by the parallel implementations (one math, one dispatch point in ``loss.py``):
    dro_loss_per_token_reference(logits_full, target, tau, rho) -> (loss, ce, tempered_ce) [...]
    dro_loss_reference(logits_full, target, tau, loss_mask, rho) -> (loss_scalar, stats)
    tempnet_reference(logits_full, params, config, dropout_mask=None) -> tau [...]
        (config.arch "paper": docs/tempnet_math.md 2; "scale_aware": ``scale_aware_reference``)
    reduce_token_losses(...): the loss-mask weighted mean and logged stats (shared by both).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_tempnet.tempnet.config import TempNetConfig

NORM_EPS = 1e-12
# scale_aware design: the floor of both variances of its features, and the clamp of its Newton
# feature (tempnet/head.py SCALE_AWARE_FEATURES)
VAR_EPS = 1e-12
FEATURE_CLAMP = 4.0
# "dro": loss = tau * CE(z/tau, y) + (rho - log V) * tau; "tempered_ce": loss = CE(z/tau, y)
OBJECTIVES = ("dro", "tempered_ce")  # docs/tempnet_math.md 2.1: x = z / max(||z||_2, 1e-12)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 ones."""
    return torch.promote_types(dtype, torch.float32)


def target_logit(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """z[..., y]; a target outside [0, V) (e.g. -100 on a masked token) reads 0."""
    valid = (target >= 0) & (target < z.shape[-1])
    picked = z.gather(-1, torch.where(valid, target, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def dro_loss_per_token_reference(logits_full: torch.Tensor, target: torch.Tensor,
                                 tau: torch.Tensor, rho: float, objective: str = "dro"):
    """Per-token l = tau * CE(z / tau, y) + (rho - log V) * tau (docs/tempnet_math.md 1.3), or
    l = CE(z / tau, y) for objective "tempered_ce" (TempNet without DRO).

    logits_full [..., V], target [...] (int), tau [...] > 0. Returns (loss, ce, tempered_ce),
    each [...]; ``loss`` is differentiable in logits and tau, the other two are detached.
    """
    z = logits_full.to(compute_dtype(logits_full.dtype))  # [..., V]
    tau = tau.to(z.dtype)
    vocab = z.shape[-1]
    log_z_tau = torch.logsumexp(z / tau.unsqueeze(-1), dim=-1)  # [...]
    tempered_ce = log_z_tau - target_logit(z, target) / tau
    if objective == "dro":
        loss = tau * tempered_ce + (rho - math.log(vocab)) * tau
    elif objective == "tempered_ce":
        loss = tempered_ce
    else:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    with torch.no_grad():
        ce = torch.logsumexp(z, dim=-1) - target_logit(z, target)
    return loss, ce, tempered_ce.detach()


def reduce_token_losses(loss_tok: torch.Tensor, ce_tok: torch.Tensor, tempered_tok: torch.Tensor,
                        tau: torch.Tensor, loss_mask: torch.Tensor):
    """Loss-mask weighted mean of per-token losses, and the logged stats (docs/tempnet_math.md 1.4).

    All inputs [...]. ``loss_mask`` (bool or float weights) 0 drops a token: it contributes
    nothing to the loss, the stats or any gradient. With no token left the loss is 0 and
    tau_min / tau_max are +inf / -inf. Stats (detached, no host sync): dro_loss, ce (plain, tau=1),
    tempered_ce, tau_mean, tau_min, tau_max, num_tokens (the mask sum: the weight for averaging
    across micro-batches / data-parallel ranks).
    """
    weight = loss_mask.to(loss_tok.dtype)  # [...]
    keep = weight != 0
    count = weight.sum()
    denom = torch.where(count > 0, count, torch.ones_like(count))

    def masked_mean(x):
        return torch.where(keep, x * weight, torch.zeros_like(x)).sum() / denom

    loss = masked_mean(loss_tok)
    tau_d = tau.detach().to(loss_tok.dtype)
    stats = {
        "dro_loss": loss.detach(),
        "ce": masked_mean(ce_tok.detach()),
        "tempered_ce": masked_mean(tempered_tok.detach()),
        "tau_mean": masked_mean(tau_d),
        "tau_min": torch.where(keep, tau_d, torch.full_like(tau_d, math.inf)).min(),
        "tau_max": torch.where(keep, tau_d, torch.full_like(tau_d, -math.inf)).max(),
        "num_tokens": count.detach(),
    }
    return loss, stats


def dro_loss_reference(logits_full: torch.Tensor, target: torch.Tensor, tau: torch.Tensor,
                       loss_mask: torch.Tensor, rho: float, objective: str = "dro"):
    """Dense DRO loss: (loss-mask weighted mean, stats); see ``reduce_token_losses``."""
    loss_tok, ce_tok, tempered_tok = dro_loss_per_token_reference(logits_full, target, tau, rho,
                                                                  objective)
    return reduce_token_losses(loss_tok, ce_tok, tempered_tok, tau, loss_mask)


def tempnet_reference(logits_full: torch.Tensor, params: dict, config: TempNetConfig,
                      dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense TempNet (docs/tempnet_math.md section 2): tau [...] from the detached logits [..., V].

    params: w1 [M, V], b1 [M], w2 [M, M], b2 [M], pool_scale [], pool_w [M], pool_c [] (the
    names of ``TempNetHead``'s parameters at TP=1). dropout_mask [..., M], already scaled by
    1/(1-p), is applied after the sigmoid; None means evaluation (no dropout).
    ``config.arch`` "scale_aware": :func:`scale_aware_reference` (its parameter names).
    """
    if config.arch == "scale_aware":
        return scale_aware_reference(logits_full, params, config, dropout_mask)
    w1 = params["w1"]
    dtype = compute_dtype(w1.dtype)
    p = {k: v.to(dtype) for k, v in params.items()}
    hidden = w1.shape[0]
    z = logits_full.detach().to(dtype)  # [..., V]
    if config.input_convention == "max_shifted":  # 2.1, optional shift
        z = z - z.amax(dim=-1, keepdim=True)
    x = F.normalize(z, p=2.0, dim=-1, eps=NORM_EPS)  # 2.1
    h = torch.sigmoid(x @ p["w1"].t() + p["b1"])  # 2.2  [..., M]
    if dropout_mask is not None:
        h = h * dropout_mask.to(dtype)
    h = h @ p["w2"].t() + p["b2"]
    a = torch.softmax(h / p["pool_scale"].exp(), dim=-1)  # 2.3
    o = ((a - 1.0 / hidden) * h) @ p["pool_w"] + p["pool_c"]  # [...]
    return config.tau_min + (config.tau_max - config.tau_min) * torch.sigmoid(o)  # 2.4


def scale_aware_reference(logits_full: torch.Tensor, params: dict, config: TempNetConfig,
                          dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense scale_aware TempNet: tau [...] from the detached logits [..., V], written directly
    from its definition (tempnet/head.py ScaleAwareTempNetHead; docs/tempnet_design.md) with
    torch's std / log_softmax, independent of the head's packed row sums.

    params: w_dir [M, V], w_feat [M, K], b_hidden [M], w_out [M], w_out_feat [K], b_out [].
    dropout_mask [..., M] (scaled by 1/(1-p)) after the tanh; None: no dropout.
    """
    dtype = compute_dtype(params["w_dir"].dtype)
    p = {k: v.to(dtype) for k, v in params.items()}
    z = logits_full.detach().to(dtype)  # [..., V]
    log_v = math.log(z.shape[-1])
    mean = z.mean(-1, keepdim=True)
    var_v = z.var(-1, unbiased=False).clamp_min(VAR_EPS)
    log_p = torch.log_softmax(z, dim=-1)
    prob = log_p.exp()
    entropy = -(prob * log_p).sum(-1)
    mean_p = (prob * z).sum(-1, keepdim=True)
    var_p = (prob * (z - mean_p) ** 2).sum(-1).clamp_min(VAR_EPS)
    gap = (z.amax(-1) - mean.squeeze(-1)) / var_v.sqrt() / math.sqrt(2 * log_v)
    newton = ((log_v - entropy - config.rho) / var_p).clamp(-FEATURE_CLAMP, FEATURE_CLAMP)
    feats = torch.stack([0.5 * var_v.log(), 0.5 * var_p.log(), entropy / log_v, gap, newton], -1)
    centred = z - mean
    x = centred / centred.norm(dim=-1, keepdim=True).clamp_min(math.sqrt(z.shape[-1] * VAR_EPS))
    h = torch.tanh(x @ p["w_dir"].t() + feats @ p["w_feat"].t() + p["b_hidden"])
    if dropout_mask is not None:
        h = h * dropout_mask.to(dtype)
    o = h @ p["w_out"] + feats @ p["w_out_feat"] + p["b_out"]
    lo, hi = math.log(config.tau_min), math.log(config.tau_max)
    start = (math.log(config.initial_tau) - lo) / (hi - lo)  # sigmoid(o0) = start
    o0 = math.log(start) - math.log1p(-start)
    return torch.exp(lo + (hi - lo) * torch.sigmoid(o + o0))
