"""Vocab-parallel DRO loss (docs/tempnet_math.md section 1, docs/parallel_design.md section 3).

Per token, with z the logits row, y its target and tau its temperature,

    l(z, y, tau) = tau * CE(z / tau, y) + (rho - log V) * tau,

V being the padded vocabulary present in the logits (V = v_local * tp). Each TP rank holds a
[..., v/tp] slice of the logits; the full [tokens, V] logits are never gathered.

Collectives (counted by tests/parallel/test_tempnet_tp.py): two all-reduces per call, like
megatron-core's fused vocab-parallel CE (its unfused one uses three):
  1. all-reduce(max) of the packed row maxima [max z/tau, max z]                   [t, 2]
  2. all-reduce(sum) of the packed row sums [sum e, sum e*(z/tau - m), z_y, sum exp(z - m1)]
                                                                                   [t, 4]
The backward needs no communication: dl/dz = p_tau - onehot(y) on each shard and
dl/dtau = rho - KL(p_tau || u) = rho - log V + H(p_tau) per row, identical on all TP ranks.

Implementations (``--dro-loss-impl``), one math: both finish with ``row_results``.
  reference  ``_VocabParallelDRO``: torch ops; holds fp32 [t, v/tp] temporaries and keeps p_tau
             (fp32) for the backward.
  fused      ``_FusedDRO``: Triton (tempnet/triton_kernels.py); one streaming pass for the row
             statistics, one for the gradient, written in the logits' dtype. Keeps only the
             logits (no copy) and [t] vectors; the same two all-reduces (``combine_row_stats``).
  fused_linear  the output projection is fused too (tempnet/fused_linear.py): the model calls it
             with the hidden states instead of this function with logits.

Layers (docs/parallel_design.md section 5): the autograd Functions, ``dro_loss_per_token``
(the one dispatch point), ``dro_loss`` (loss-mask weighted mean + logged stats, shared with the
reference).
"""
from __future__ import annotations

import importlib.util
import math
import os

import torch

from megatron_tempnet.tempnet.comm import MAX, SUM, all_reduce, group_rank_size
from megatron_tempnet.tempnet.reference import OBJECTIVES, compute_dtype, reduce_token_losses

IMPLS = ("reference", "fused", "fused_linear")  # tempnet.config.DRO_LOSS_IMPLS adds "auto"


def check_objective(objective: str) -> None:
    """Raise ValueError unless ``objective`` is one of ``OBJECTIVES``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"DRO loss: unknown objective {objective!r}; choose one of {OBJECTIVES}")


def row_results(m_tau, sum_exp_tau, weighted, z_y, m_one, sum_exp_one, tau, rho: float,
                log_vocab: float, objective: str):
    """Per-row results from the TP-reduced row statistics, each [t] (docs/tempnet_math.md 1.5-1.6).

    Inputs: m_tau = max z/tau, sum_exp_tau = S = sum exp(z/tau - m_tau), weighted = A =
    sum exp(z/tau - m_tau) * (z/tau - m_tau), z_y (target logit), m_one = max z, sum_exp_one =
    sum exp(z - m_one), tau. With log Z_tau = m_tau + log S, H(p_tau) = log S - A/S and
    E_p[z/tau] = m_tau + A/S, returns (loss, ce, tempered_ce, grad_tau, grad_scale):

    objective "dro":          loss = tau * CE(z/tau, y) + (rho - log V) * tau
                              dloss/dz = (p_tau - e_y),          dloss/dtau = rho - KL(p_tau || u)
    objective "tempered_ce":  loss = CE(z/tau, y)
                              dloss/dz = (p_tau - e_y) / tau,
                              dloss/dtau = (z_y/tau - E_p[z/tau]) / tau
    grad_scale is the per-row factor of (p_tau - e_y) in dloss/dz. Every implementation (torch,
    fused kernels) finishes with this function, so the math lives here once.
    """
    log_sum = torch.log(sum_exp_tau)
    tempered_ce = m_tau + log_sum - z_y / tau
    ce = m_one + torch.log(sum_exp_one) - z_y
    mean_shift = weighted / sum_exp_tau  # E_p[z/tau] - m_tau
    if objective == "dro":
        loss = tau * tempered_ce + (rho - log_vocab) * tau
        grad_tau = rho - log_vocab + log_sum - mean_shift  # rho - log V + H(p_tau)
        grad_scale = torch.ones_like(tau)
    elif objective == "tempered_ce":
        loss = tempered_ce.clone()  # its own tensor: the Functions mark tempered_ce detached
        grad_tau = (z_y / tau - m_tau - mean_shift) / tau
        grad_scale = 1.0 / tau
    else:
        check_objective(objective)
    return loss, ce, tempered_ce, grad_tau, grad_scale


class _VocabParallelDRO(torch.autograd.Function):
    """Per-token DRO loss on a vocab shard; returns (loss, ce, tempered_ce), each [t]."""

    @staticmethod
    def forward(ctx, logits, target, tau, rho, tp_group, objective):
        # logits [t, v/tp] (any float dtype), target [t] (global ids), tau [t] (same on all ranks)
        rank, size = group_rank_size(tp_group)
        v_local = logits.shape[-1]
        log_vocab = math.log(v_local * size)
        start = rank * v_local

        z = logits.to(compute_dtype(logits.dtype))  # [t, v/tp] fp32 (fp64 stays fp64)
        tau_dtype, tau = tau.dtype, tau.to(z.dtype)  # [t]
        z_tau = z / tau.unsqueeze(-1)  # [t, v/tp]

        # 1. row maxima of z/tau and z, one all-reduce(max)
        maxima = torch.stack([z_tau.amax(dim=-1), z.amax(dim=-1)], dim=-1)  # [t, 2]
        all_reduce(maxima, MAX, tp_group)
        m_tau, m_one = maxima.unbind(-1)  # [t], [t]

        # 2. local sums: target logit (owning rank only), plain and tempered softmax sums
        owned = (target >= start) & (target < start + v_local)  # [t]
        local_target = torch.where(owned, target - start, 0).long()  # [t]
        z_y = z.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        z_y = torch.where(owned, z_y, torch.zeros_like(z_y))  # [t]
        sum_exp_one = (z - m_one.unsqueeze(-1)).exp_().sum(dim=-1)  # [t]  plain CE, tau = 1
        del z  # from here on only z/tau is needed
        z_tau.sub_(m_tau.unsqueeze(-1))  # shifted tempered logits          [t, v/tp]
        exp_tau = torch.exp(z_tau)  # [t, v/tp]
        sums = torch.stack([exp_tau.sum(dim=-1),  # S = sum e
                            torch.linalg.vecdot(exp_tau, z_tau, dim=-1),  # A = sum e*(z/tau - m)
                            z_y, sum_exp_one], dim=-1)  # [t, 4]
        del z_tau
        all_reduce(sums, SUM, tp_group)
        sum_exp_tau, weighted, z_y, sum_exp_one = sums.unbind(-1)

        # 3. per-row results and gradient coefficients (shared with the fused kernels)
        loss, ce, tempered_ce, grad_tau, grad_scale = row_results(
            m_tau, sum_exp_tau, weighted, z_y, m_one, sum_exp_one, tau, rho, log_vocab, objective)

        ctx.logits_dtype, ctx.tau_dtype = logits.dtype, tau_dtype
        if ctx.needs_input_grad[0]:  # p_tau is kept only when the LM is trained
            probs = exp_tau.div_(sum_exp_tau.unsqueeze(-1))  # [t, v/tp] p_tau, in place
            ctx.save_for_backward(probs, owned, local_target, grad_tau, grad_scale)
        else:
            ctx.save_for_backward(None, None, None, grad_tau, None)
        ctx.mark_non_differentiable(ce, tempered_ce)
        return loss, ce, tempered_ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_tempered):
        probs, owned, local_target, grad_tau, grad_scale = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            # dl/dz = (p_tau - onehot(y)) * grad_scale * grad, in place in the saved p_tau (one
            # backward only, as megatron-core's vocab-parallel CE)
            rows = torch.arange(probs.shape[0], device=probs.device)
            probs[rows, local_target] -= owned.to(probs.dtype)
            row_grad = grad_loss.to(probs.dtype) * grad_scale
            grad_logits = probs.mul_(row_grad.unsqueeze(-1))
            grad_logits = grad_logits.to(ctx.logits_dtype)
        grad_of_tau = None
        if ctx.needs_input_grad[2]:  # per row, identical on all TP ranks
            grad_of_tau = (grad_loss * grad_tau).to(ctx.tau_dtype)
        return grad_logits, None, grad_of_tau, None, None, None


def combine_row_stats(local: torch.Tensor, tp_group):
    """Merge per-shard row statistics [t, 6] (triton_kernels.row_stats: m_tau, S, A, m_one,
    S_one, z_y, each relative to the shard's own maxima) into the full-vocabulary ones.

    Collectives: all-reduce(max) of [m_tau, m_one] [t, 2], then all-reduce(sum) of the sums
    rescaled to the global maxima [t, 4] (as the torch path). TP=1: scale factors are exactly 1.
    Returns (m_tau, S, A, z_y, m_one, S_one), each [t] fp32.
    """
    maxima = local[:, [0, 3]].clone()  # [t, 2]
    all_reduce(maxima, MAX, tp_group)
    m_tau, m_one = maxima.unbind(-1)
    shift = local[:, 0] - m_tau  # <= 0: this shard's max relative to the global one
    scale = torch.exp(shift)
    sums = torch.stack([local[:, 1] * scale,  # S
                        scale * (local[:, 2] + shift * local[:, 1]),  # A
                        local[:, 5],  # z_y (0 on the shards not owning y)
                        local[:, 4] * torch.exp(local[:, 3] - m_one)], dim=-1)  # S_one  [t, 4]
    all_reduce(sums, SUM, tp_group)
    sum_exp_tau, weighted, z_y, sum_exp_one = sums.unbind(-1)
    return m_tau, sum_exp_tau, weighted, z_y, m_one, sum_exp_one


def fused_row_results(logits, target, tau, rho: float, tp_group, objective: str):
    """Row statistics by the Triton kernel, merged over TP, finished by ``row_results``.

    logits [t, v/tp] (rows contiguous, bf16/fp16/fp32), target [t], tau [t]. Returns
    (loss, ce, tempered_ce, grad_tau, grad_scale, m_tau, log_sum), each [t] fp32; m_tau = max
    z/tau and log_sum = log sum exp(z/tau - m_tau) over the full vocabulary (what
    ``triton_kernels.write_grad`` needs).
    """
    from megatron_tempnet.tempnet import triton_kernels

    rank, size = group_rank_size(tp_group)
    v_local = logits.shape[-1]
    local = triton_kernels.row_stats(logits, tau, target, rank * v_local)
    m_tau, sum_exp_tau, weighted, z_y, m_one, sum_exp_one = combine_row_stats(local, tp_group)
    results = row_results(m_tau, sum_exp_tau, weighted, z_y, m_one, sum_exp_one,
                          tau.to(torch.float32), rho, math.log(v_local * size), objective)
    return (*results, m_tau, torch.log(sum_exp_tau))


class _FusedDRO(torch.autograd.Function):
    """``_VocabParallelDRO`` with Triton streaming passes: keeps the logits and [t] vectors."""

    @staticmethod
    def forward(ctx, logits, target, tau, rho, tp_group, objective):
        loss, ce, tempered_ce, grad_tau, grad_scale, m_tau, log_sum = fused_row_results(
            logits, target, tau, rho, tp_group, objective)
        ctx.tp_group, ctx.tau_dtype = tp_group, tau.dtype
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, target, tau, m_tau, log_sum, grad_tau, grad_scale)
        else:
            ctx.save_for_backward(None, None, None, None, None, grad_tau, None)
        ctx.mark_non_differentiable(ce, tempered_ce)
        return loss, ce, tempered_ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_tempered):
        from megatron_tempnet.tempnet import triton_kernels

        logits, target, tau, m_tau, log_sum, grad_tau, grad_scale = ctx.saved_tensors
        grad_logits = grad_of_tau = None
        if ctx.needs_input_grad[0]:
            rank, _ = group_rank_size(ctx.tp_group)
            grad_logits = triton_kernels.write_grad(
                logits, torch.empty_like(logits), tau, target, m_tau, log_sum,
                grad_loss.float() * grad_scale, rank * logits.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_of_tau = (grad_loss * grad_tau).to(ctx.tau_dtype)
        return grad_logits, None, grad_of_tau, None, None, None


def kernels_available(device: torch.device) -> str | None:
    """None if the Triton kernels can run on ``device``, else the reason they cannot."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton, or the [gpu] extra)"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None  # Triton's interpreter runs the kernels on the CPU (tests; slow)
    return (f"the logits are on {device.type}; Triton kernels need a CUDA device (or "
            "TRITON_INTERPRET=1 for Triton's CPU interpreter, slow, used by the tests)")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation to run for ``--dro-loss-impl impl`` on ``device``: "auto" is "fused"
    where the kernels can run and "reference" elsewhere; an explicit fused choice that cannot run
    is an error naming the reason."""
    if impl == "auto":
        return "fused" if device.type == "cuda" and kernels_available(device) is None \
            else "reference"
    if impl not in IMPLS:
        raise ValueError(f"--dro-loss-impl {impl!r}: choose one of auto, {', '.join(IMPLS)}")
    if impl != "reference":
        why = kernels_available(device)
        if why is not None:
            raise RuntimeError(f"--dro-loss-impl {impl} cannot run: {why}; use "
                               "--dro-loss-impl reference (or auto)")
    return impl


def _check_shapes(logits, target, tau):
    lead = tuple(logits.shape[:-1])
    if tuple(target.shape) != lead or tuple(tau.shape) != lead:
        raise ValueError(f"DRO loss: logits {tuple(logits.shape)} need target and tau of shape "
                         f"{lead} (the logits' leading dims, e.g. [s, b] for [s, b, v/tp]); got "
                         f"target {tuple(target.shape)} and tau {tuple(tau.shape)}")
    if target.dtype.is_floating_point:
        raise ValueError(f"DRO loss: target must hold integer token ids, got {target.dtype}")


def dro_loss_per_token(logits_shard: torch.Tensor, target: torch.Tensor, tau: torch.Tensor,
                       rho: float, tp_group=None, objective: str = "dro",
                       impl: str = "reference"):
    """Per-token (loss, ce, tempered_ce), each [...]: the one dispatch point of the DRO loss.

    logits_shard [..., v/tp] (this rank's vocabulary slice, rank r holding ids
    [r*v/tp, (r+1)*v/tp)), target [...] global token ids (out of range, e.g. -100, reads z_y = 0:
    only for masked tokens), tau [...] > 0 and identical on all TP ranks. ``loss`` is
    differentiable in logits and tau; ce (plain, tau = 1) and tempered_ce are for logging.
    objective "dro" (the DRO loss) or "tempered_ce" (loss = CE(z/tau, y): TempNet without DRO);
    see ``row_results``. tp_group None or of size 1: no communication. impl: "reference",
    "fused" or "auto" (``resolve_impl``); "fused_linear" computes the same per-token values here
    with the fused kernel (the model fuses the output projection itself).
    """
    _check_shapes(logits_shard, target, tau)
    check_objective(objective)
    impl = resolve_impl(impl, logits_shard.device)
    lead = target.shape
    flat = logits_shard.reshape(-1, logits_shard.shape[-1])  # [t, v/tp]
    function = _VocabParallelDRO
    if impl != "reference":
        if flat.dtype == torch.float64:
            raise ValueError("DRO loss: the fused kernels compute in fp32; fp64 logits need "
                             "--dro-loss-impl reference")
        function, flat = _FusedDRO, flat.contiguous()
    loss, ce, tempered = function.apply(flat, target.reshape(-1), tau.reshape(-1), float(rho),
                                        tp_group, objective)
    return loss.view(lead), ce.view(lead), tempered.view(lead)


def dro_loss(logits_shard: torch.Tensor, target: torch.Tensor, tau: torch.Tensor,
             loss_mask: torch.Tensor, rho: float, tp_group=None, objective: str = "dro",
             impl: str = "reference"):
    """Loss-mask weighted mean DRO loss (or tempered CE, ``objective``) and detached stats
    (docs/tempnet_math.md 1, docs/parallel_design.md 3); ``impl`` as in ``dro_loss_per_token``.

    Shapes: logits_shard [s, b, v/tp] (megatron's layout) or any [..., v/tp]; target, tau and
    loss_mask [...] (e.g. [s, b]). Returns (loss_scalar, stats) with stats = {dro_loss, ce,
    tempered_ce, tau_mean, tau_min, tau_max, num_tokens}: detached tensors, no host sync.
    """
    _check_shapes(logits_shard, target, tau)
    if tuple(loss_mask.shape) != tuple(target.shape):
        raise ValueError(f"DRO loss: loss_mask {tuple(loss_mask.shape)} must have the target's "
                         f"shape {tuple(target.shape)}")
    loss_tok, ce_tok, tempered_tok = dro_loss_per_token(logits_shard, target, tau, rho, tp_group,
                                                        objective, impl)
    return reduce_token_losses(loss_tok, ce_tok, tempered_tok, tau, loss_mask)
