"""The exact per-token tau of the DRO loss without TempNet (loss_mode "dro_exact"), vocab-parallel.

docs/tempnet_math.md sections 1 and 3: the DRO loss is the dual value min over tau of

    l(z, y, tau) = tau * CE(z / tau, y) + (rho - log V) * tau,     dl/dtau = rho - KL(p_tau || u).

l is convex in tau (a perspective function plus a linear term) and KL(p_tau || u) = log V - H(p_tau)
decreases in tau, so the minimiser over [tau_min, tau_max] is the root tau* of
f(tau) = KL(p_tau || u) - rho when it lies inside, else the bound where l is smallest: tau_min when
f(tau_min) <= 0 (KL never reaches rho: dl/dtau >= 0 throughout), tau_max when f(tau_max) >= 0.
By the envelope theorem (dl/dtau = 0 at an interior root, a bound does not move with z) the loss
at tau* treated as a constant has the exact gradient of the dual value, so tau* is detached.

Per row, with u = (z - max z) / tau (<= 0) and the shard sums S = sum exp(u), A = sum exp(u) u,
B = sum exp(u) u^2 (all-reduced over TP):

    H(p_tau) = log S - A/S,      Var_p(z / tau) = B/S - (A/S)^2,
    d KL / d log(tau) = -tau dH/dtau = -Var_p(z / tau).

Newton on x = log(tau) steps x <- x + (KL - rho) / Var_p(z/tau), safeguarded by a bracket
[lo, hi] with f(lo) > 0 > f(hi) (rtsafe): a step leaving the bracket, or a zero variance, is
replaced by bisection of the bracket, so every iteration converges and none diverges.

Collectives (all from the TP group; every rank sees the same reduced values and so takes the
same decisions and iteration count, without extra communication):
  1. all-reduce(max) of the row maxima of z                                            [t]
  2. all-reduce(sum) of [S, A, B] at tau_min and tau_max together                      [t, 6]
  3. per Newton iteration, one all-reduce(sum) of [S, A, B]                            [t, 3]
A row stops when |KL - rho| <= ``kl_tol`` (after one last Newton step, which squares the error
in tau), when its log-tau step is below the dtype's resolution, or after ``max_iters``
(measured on random logits: 4 to 9 iterations, fewer rows in the later ones; about 4 to 6
passes over the logits in all). Each iteration works only on the rows not converged yet, and
one host synchronisation per iteration finds them (the same on every rank).
"""
from __future__ import annotations

import math

import torch

from megatron_tempnet.tempnet.comm import MAX, SUM, all_reduce, group_rank_size
from megatron_tempnet.tempnet.reference import compute_dtype

MAX_ITERS = 30
# |KL(p_tau || u) - rho| below which an interior row has converged, per compute dtype
KL_TOL = {torch.float32: 1e-5, torch.float64: 1e-11}


def _kl_and_var(z_shift: torch.Tensor, tau: torch.Tensor, log_vocab: float, tp_group):
    """Per-row (KL(p_tau || u), Var_p(z/tau)) [t, J] for temperatures tau [t, J], from the
    max-shifted logits shard z_shift [t, v/tp] (<= 0); one all-reduce(sum) of [t, 3J]."""
    sums = []
    for j in range(tau.shape[1]):
        u = z_shift / tau[:, j:j + 1]  # [t, v/tp] <= 0
        e = torch.exp(u)
        s = e.sum(-1)
        e.mul_(u)  # e * u
        sums += [s, e.sum(-1), torch.linalg.vecdot(e, u, dim=-1)]
        del u, e
    packed = all_reduce(torch.stack(sums, -1), SUM, tp_group)  # [t, 3J]
    s, a, b = packed[:, 0::3], packed[:, 1::3], packed[:, 2::3]  # [t, J] each
    mean = a / s  # E_p[u], <= 0
    kl = log_vocab - (torch.log(s) - mean)
    var = (b / s - mean * mean).clamp_min(0.0)
    return kl, var


@torch.no_grad()
def solve_tau(logits_shard: torch.Tensor, rho: float, tau_min: float, tau_max: float,
              tp_group=None, *, max_iters: int = MAX_ITERS, kl_tol: float | None = None):
    """tau* [...] in [tau_min, tau_max] minimising the DRO loss of each row (see the module doc).

    logits_shard [..., v/tp]: this rank's vocabulary slice (V = v/tp * TP, the padded vocabulary
    present in the logits); rho >= 0; 0 < tau_min < tau_max. tp_group None or of size 1: no
    communication. No autograd; computed in fp32 (fp64 for fp64 logits) and returned in that
    dtype, identical on all TP ranks. ``kl_tol`` defaults to ``KL_TOL`` of the compute dtype.
    """
    if not 0 < tau_min < tau_max:
        raise ValueError(f"solve_tau: need 0 < tau_min < tau_max, got [{tau_min}, {tau_max}]")
    _, size = group_rank_size(tp_group)
    lead, v_local = logits_shard.shape[:-1], logits_shard.shape[-1]
    dtype = compute_dtype(logits_shard.dtype)
    kl_tol = KL_TOL.get(dtype, 1e-5) if kl_tol is None else kl_tol
    log_vocab = math.log(v_local * size)
    z = logits_shard.detach().reshape(-1, v_local).to(dtype)  # [t, v/tp]
    t = z.shape[0]
    row_max = all_reduce(z.amax(dim=-1), MAX, tp_group)  # [t]  (1)
    z = z - row_max.unsqueeze(-1)  # [t, v/tp] <= 0 (a copy: the input is untouched)

    # (2) the bounds: clamped rows and the bracket of the interior ones
    bounds = torch.tensor([tau_min, tau_max], dtype=dtype, device=z.device).expand(t, 2)
    kl, var = _kl_and_var(z, bounds, log_vocab, tp_group)  # [t, 2]
    f_lo, f_hi = kl[:, 0] - rho, kl[:, 1] - rho
    lo = torch.full((t,), math.log(tau_min), dtype=dtype, device=z.device)  # f(lo) > 0
    hi = torch.full((t,), math.log(tau_max), dtype=dtype, device=z.device)  # f(hi) < 0
    x = torch.where(f_lo <= 0, lo, hi)  # clamped rows keep their bound
    active = (f_lo > 0) & (f_hi < 0)  # [t] a root strictly inside
    # start: the Newton step from the bound with the smaller |f| (bisection if it leaves)
    from_lo = f_lo.abs() <= f_hi.abs()
    x0 = torch.where(from_lo, lo + f_lo / var[:, 0], hi + f_hi / var[:, 1])
    x0 = torch.where((x0 > lo) & (x0 < hi), x0, 0.5 * (lo + hi))
    x = torch.where(active, x0, x)

    resolution = 4 * torch.finfo(dtype).eps
    for _ in range(max_iters):  # (3) on the rows not converged yet
        rows = active.nonzero().squeeze(-1)  # the same on all ranks: the values are all-reduced
        if rows.numel() == 0:
            break
        z_rows = z if rows.numel() == t else z.index_select(0, rows)
        x_r, lo_r, hi_r = x[rows], lo[rows], hi[rows]
        kl, var = _kl_and_var(z_rows, x_r.exp().unsqueeze(-1), log_vocab, tp_group)
        f, var = kl[:, 0] - rho, var[:, 0]
        lo_r, hi_r = torch.where(f > 0, x_r, lo_r), torch.where(f < 0, x_r, hi_r)
        newton = x_r + f / var  # d f / d log(tau) = -Var_p(z/tau)
        inside = torch.isfinite(newton) & (newton > lo_r) & (newton < hi_r)
        # converged rows take a last Newton step if it stays inside the bracket (quadratic: tau*
        # to about the dtype's resolution, so the result hardly depends on the reduction order)
        done = f.abs() <= kl_tol
        x_new = torch.where(inside, newton, torch.where(done, x_r, 0.5 * (lo_r + hi_r)))
        small = (x_new - x_r).abs() <= resolution * x_r.abs().clamp_min(1.0)
        x[rows], lo[rows], hi[rows] = x_new, lo_r, hi_r
        active[rows] = ~done & ~small & (hi_r - lo_r > resolution)
    tau = x.exp().clamp_(tau_min, tau_max)
    tau = torch.where(f_lo <= 0, tau_min, torch.where(f_hi >= 0, tau_max, tau))
    return tau.view(lead)
