"""Triton kernels of the fused DRO loss (docs/parallel_design.md 5.2): two streaming passes.

Pass 1, ``row_stats``: one program per row walks this rank's vocabulary shard in blocks of
``BLOCK`` with fp32 accumulators and online rescaling (the flash-softmax trick), reading each
logit once, and writes six numbers per row:

    m_tau = max z/tau,  S = sum exp(z/tau - m_tau),  A = sum exp(z/tau - m_tau) * (z/tau - m_tau),
    m_one = max z,      S_one = sum exp(z - m_one),   z_y (0 unless this shard owns the target).

When the running max moves from m to m', S' = e^(m - m') S and A' = e^(m - m') (A + (m - m') S).
``loss.combine_row_stats`` merges the per-shard rows across TP ranks (the same two all-reduces as
the torch path); ``loss.row_results`` turns them into the loss and gradient coefficients.

Pass 2, ``write_grad``: dl/dz = (exp(z/tau - m_tau - log S) - onehot(y)) * coef per row (m_tau
and log S kept apart: at |z/tau| ~ 1e4 their fp32 sum would lose ~1e-3), written in the
logits' dtype to ``out`` (``out`` may be the logits tensor itself: each element is read before
it is written by the same program). Nothing of size [tokens, V] is allocated besides ``out``.

One program per row and no atomics: results are bitwise reproducible run to run (the
deterministic option is the only mode). On a CPU the kernels run under Triton's interpreter
(TRITON_INTERPRET=1, set before this module is first imported), which the tests use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_STATS = 6  # m_tau, S, A, m_one, S_one, z_y
# finite "minus infinity" for the running maxima: e^(_NEG - m) = 0 and (_NEG - m) * 0 = 0, no NaN
_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _row_stats_kernel(z_ptr, z_stride, tau_ptr, target_ptr, stats_ptr, n_cols, vocab_start,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    inv_tau = 1.0 / tl.load(tau_ptr + row).to(tl.float32)
    y = tl.load(target_ptr + row).to(tl.int64) - vocab_start
    m_tau = _NEG
    s_tau = 0.0
    a_tau = 0.0
    m_one = _NEG
    s_one = 0.0
    z_y = 0.0
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n_cols
        z = tl.load(z_row + offs, mask=inside, other=0.0).to(tl.float32)
        u = z * inv_tau
        # tempered softmax sums, rescaled to the new running max
        new_m = tl.maximum(m_tau, tl.max(tl.where(inside, u, _NEG), 0))
        shift = m_tau - new_m
        rescale = tl.exp(shift)
        d = tl.where(inside, u - new_m, 0.0)
        e = tl.where(inside, tl.exp(d), 0.0)
        a_tau = rescale * (a_tau + shift * s_tau) + tl.sum(e * d, 0)
        s_tau = rescale * s_tau + tl.sum(e, 0)
        m_tau = new_m
        # plain softmax sum (tau = 1) for the reported cross-entropy
        new_one = tl.maximum(m_one, tl.max(tl.where(inside, z, _NEG), 0))
        e_one = tl.where(inside, tl.exp(z - new_one), 0.0)
        s_one = tl.exp(m_one - new_one) * s_one + tl.sum(e_one, 0)
        m_one = new_one
        z_y += tl.sum(tl.where(inside & (offs == y), z, 0.0), 0)
    out = stats_ptr + row * 6
    tl.store(out + 0, m_tau)
    tl.store(out + 1, s_tau)
    tl.store(out + 2, a_tau)
    tl.store(out + 3, m_one)
    tl.store(out + 4, s_one)
    tl.store(out + 5, z_y)


@triton.jit
def _write_grad_kernel(z_ptr, z_stride, out_ptr, out_stride, tau_ptr, target_ptr, max_ptr,
                       log_sum_ptr, coef_ptr, n_cols, vocab_start, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    out_row = out_ptr + row * out_stride
    inv_tau = 1.0 / tl.load(tau_ptr + row).to(tl.float32)
    y = tl.load(target_ptr + row).to(tl.int64) - vocab_start
    row_max = tl.load(max_ptr + row)
    log_sum = tl.load(log_sum_ptr + row)
    coef = tl.load(coef_ptr + row)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n_cols
        z = tl.load(z_row + offs, mask=inside, other=0.0).to(tl.float32)
        p = tl.exp((z * inv_tau - row_max) - log_sum)  # not - (max + log S): fp32 rounding
        grad = (p - tl.where(offs == y, 1.0, 0.0)) * coef
        tl.store(out_row + offs, grad.to(out_ptr.dtype.element_ty), mask=inside)


def _block(n_cols: int, block: int | None) -> int:
    return block or min(4096, triton.next_power_of_2(max(n_cols, 16)))


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 2 or t.stride(-1) != 1:
        raise ValueError(f"fused DRO kernel: {name} must be a 2-D [tokens, v] tensor with "
                         f"contiguous rows, got shape {tuple(t.shape)} strides {t.stride()}")
    return t


def row_stats(logits: torch.Tensor, tau: torch.Tensor, target: torch.Tensor, vocab_start: int,
              block: int | None = None) -> torch.Tensor:
    """Per-row statistics [t, NUM_STATS] (fp32) of this shard; see the module docstring.

    logits [t, v] (rows contiguous, any float dtype), tau [t], target [t] global ids (this shard
    holds ids [vocab_start, vocab_start + v)).
    """
    _rows(logits, "logits")
    t, v = logits.shape
    stats = torch.empty(t, NUM_STATS, dtype=torch.float32, device=logits.device)
    if t:
        _row_stats_kernel[(t,)](logits, logits.stride(0), tau.contiguous(),
                                target.contiguous(), stats, v, vocab_start,
                                BLOCK=_block(v, block))
    return stats


def write_grad(logits: torch.Tensor, out: torch.Tensor, tau: torch.Tensor, target: torch.Tensor,
               row_max: torch.Tensor, log_sum: torch.Tensor, coef: torch.Tensor,
               vocab_start: int, block: int | None = None) -> torch.Tensor:
    """out[r] = (exp(logits[r] / tau[r] - row_max[r] - log_sum[r]) - onehot(y_r)) * coef[r].

    row_max [t] = max z/tau and log_sum [t] = log sum exp(z/tau - row_max) over the FULL
    vocabulary (all TP shards), coef [t]; returns ``out``.
    ``out`` [t, v] may be ``logits`` itself (in place).
    """
    _rows(logits, "logits")
    _rows(out, "out")
    t, v = logits.shape
    if t:
        _write_grad_kernel[(t,)](logits, logits.stride(0), out, out.stride(0),
                                 tau.contiguous(), target.contiguous(),
                                 row_max.float().contiguous(), log_sum.float().contiguous(),
                                 coef.float().contiguous(), v,
                                 vocab_start, BLOCK=_block(v, block))
    return out
