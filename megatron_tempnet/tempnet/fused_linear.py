"""Fused linear DRO loss: output projection + tau + DRO loss in token chunks.

Design: docs/parallel_design.md section 5.3.

The full [tokens, V/tp] logits never exist: for each chunk of rows, the logits chunk is computed
(hidden @ W^T), tau is computed from it (TempNet's head, a fixed tau, or any ``tau_fn``), the row
statistics come from the Triton kernel (``loss.fused_row_results``: two all-reduces per chunk
under TP), and the gradients are formed at once (the idea of Liger's fused linear cross-entropy):

    G_chunk = (p_tau - onehot(y)) * w * grad_scale     written over the logits chunk, in place
    dL/dhidden[chunk] = G_chunk @ W,   dL/dW += G_chunk^T @ hidden[chunk]
    dL/dtheta += d tau_chunk / d theta . (w * dl/dtau)   (autograd through ``tau_fn`` per chunk)

for L = sum_t w_t * l_t with w the token weights (the loss mask). The backward receives the
per-token upstream gradient; since the gradients were formed in the forward, it must be
c * w for one scalar c (what ``training.step.masked_sum_loss`` and megatron's token-mean give);
anything else is refused with an error rather than silently wrong.

Memory: one [chunk, V/tp] logits chunk in the hidden states' dtype, the gradients of hidden
(like the input) and of W (in W's dtype, accumulated chunk by chunk, as Liger) and [t] vectors.
Three GEMMs per chunk (logits, dhidden, dW), plus TempNet's W1 z and its backward.

Under TP the caller passes hidden states already in the TP region (megatron-core's
``copy_to_tensor_model_parallel_region``, whose backward all-reduces the partial dhidden), W this
rank's vocabulary rows [V/tp, H]. Dropout inside ``tau_fn`` draws its masks chunk by chunk, so
with dropout the masks differ from the unchunked path's (same distribution).
"""
from __future__ import annotations

import torch

from megatron_tempnet.tempnet.comm import group_rank_size
from megatron_tempnet.tempnet.loss import check_objective, fused_row_results, resolve_impl


def default_chunk_tokens(tokens: int, vocab_local: int, hidden: int) -> int:
    """Liger's rule: chunks whose logits are about as large as the hidden states [t, H]."""
    parts = max(1, -(-vocab_local // hidden))
    rows = -(-tokens // parts)
    return 1 << max(0, (rows - 1).bit_length())  # next power of two


class _FusedLinearDRO(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, target, token_weight, rho, tp_group, objective, chunk,
                tau_fn, *tau_params):
        from megatron_tempnet.tempnet import triton_kernels  # Triton stays an optional import

        rank, _ = group_rank_size(tp_group)
        tokens = hidden.shape[0]
        start = rank * weight.shape[0]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        trained = [p for p, need in zip(tau_params, ctx.needs_input_grad[9:]) if need]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in trained]
        out = torch.empty(4, tokens, dtype=torch.float32, device=hidden.device)
        for begin in range(0, tokens, chunk):
            rows = slice(begin, min(begin + chunk, tokens))
            h = hidden[rows]
            logits = h @ weight.t()  # [c, v/tp]
            with torch.enable_grad() if trained else torch.no_grad():
                tau = tau_fn(logits.detach(), rows)  # [c]
            y = target[rows]
            loss, ce, tempered, grad_tau, grad_scale, m_tau, log_sum = fused_row_results(
                logits, y, tau.detach(), rho, tp_group, objective)
            w = token_weight[rows].to(torch.float32)
            if trained and tau.requires_grad:  # TempNet's gradient before the logits are reused
                for acc, g in zip(grad_params, torch.autograd.grad(
                        tau, trained, (w * grad_tau).to(tau.dtype), allow_unused=True)):
                    if g is not None:
                        acc += g
            if need_hidden or need_weight:
                g = triton_kernels.write_grad(logits, logits, tau.detach(), y, m_tau, log_sum,
                                              w * grad_scale, start)  # in place
                if need_hidden:
                    torch.matmul(g, weight, out=grad_hidden[rows])
                if need_weight:
                    grad_weight.addmm_(g.t(), h)
            out[:, rows] = torch.stack([loss, ce, tempered, tau.detach().to(torch.float32)])
        ctx.param_needs = list(ctx.needs_input_grad[9:])
        ctx.param_dtypes = [p.dtype for p in trained]
        ctx.save_for_backward(token_weight, grad_hidden, grad_weight, *grad_params)
        loss, ce, tempered, tau = out.unbind(0)
        ctx.mark_non_differentiable(ce, tempered, tau)
        return loss, ce, tempered, tau

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_tempered, _grad_tau):
        token_weight, grad_hidden, grad_weight, *grad_params = ctx.saved_tensors
        scale = _common_scale(grad_loss, token_weight)
        grads = [None] * (9 + len(ctx.param_needs))
        if grad_hidden is not None:
            grads[0] = grad_hidden.mul_(scale.to(grad_hidden.dtype))
        if grad_weight is not None:
            grads[1] = grad_weight.mul_(scale.to(grad_weight.dtype))
        trained = iter(zip(grad_params, ctx.param_dtypes))
        for i, need in enumerate(ctx.param_needs):
            if need:
                g, dtype = next(trained)
                grads[9 + i] = (g * scale).to(dtype)
        return tuple(grads)


def _common_scale(grad_loss: torch.Tensor, token_weight: torch.Tensor) -> torch.Tensor:
    """c with grad_loss == c * token_weight (a 0-dim fp32 tensor); refuses anything else."""
    g, w = grad_loss.to(torch.float32), token_weight.to(torch.float32)
    norm = (w * w).sum()
    scale = torch.where(norm > 0, (g * w).sum() / norm.clamp_min(1e-30), torch.zeros_like(norm))
    residual = (g - scale * w).abs().max() if g.numel() else torch.zeros(())
    bound = 1e-5 * g.abs().max() if g.numel() else torch.zeros(())
    if bool(residual > bound + 1e-30):
        raise RuntimeError(
            "fused_linear DRO loss: the upstream per-token gradient is not proportional to the "
            "token weights (loss mask) given to the loss, so the gradients formed in the forward "
            "do not apply. Reduce the per-token losses as sum(loss * loss_mask) times a "
            "constant (training.step.masked_sum_loss does), or use --dro-loss-impl fused.")
    return scale


def fused_linear_dro_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                          token_weight: torch.Tensor, tau_fn, rho: float, tp_group=None,
                          objective: str = "dro", tau_params=(), chunk_tokens: int | None = None):
    """Per-token (loss, ce, tempered_ce, tau) [t] of the projection hidden @ weight^T, fused.

    hidden [t, H] (in the TP region, see the module docstring), weight [V/tp, H] this rank's
    output-layer rows, target [t] global ids (ignored tokens any id, with weight 0),
    token_weight [t] the loss mask. ``tau_fn(logits_chunk [c, V/tp] detached, rows) -> tau [c]``
    identical on all TP ranks; ``tau_params`` the tensors it differentiates to (TempNet's
    parameters; empty for a fixed or solved tau). ``loss`` is differentiable in hidden, weight
    and tau_params; the backward needs an upstream gradient proportional to token_weight.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear DRO loss: hidden [t, H] and weight [V/tp, H] expected, "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if tuple(target.shape) != hidden.shape[:1] or tuple(token_weight.shape) != hidden.shape[:1]:
        raise ValueError(f"fused_linear DRO loss: target {tuple(target.shape)} and token_weight "
                         f"{tuple(token_weight.shape)} must be [{hidden.shape[0]}]")
    check_objective(objective)
    if hidden.dtype == torch.float64:
        raise ValueError("fused_linear DRO loss computes in fp32; fp64 needs "
                         "--dro-loss-impl reference")
    resolve_impl("fused_linear", hidden.device)  # a clear error where Triton cannot run
    chunk = int(chunk_tokens or default_chunk_tokens(*hidden.shape[:1], *weight.shape))
    if chunk < 1:
        raise ValueError(f"fused_linear DRO loss: chunk_tokens must be >= 1, got {chunk}")
    return _FusedLinearDRO.apply(hidden.contiguous(), weight, target.contiguous(), token_weight,
                                 float(rho), tp_group, objective, chunk, tau_fn, *tau_params)
