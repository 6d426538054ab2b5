"""The exact tau* of loss_mode "dro_exact" (tempnet/exact_tau.py), one process (TP=1).

Oracles are float64 dense computations of docs/tempnet_math.md 1 and 3, independent of the solver:
KL(p_tau || u) = log V + sum p log p from log_softmax, the DRO loss l(z, y, tau) on a fine tau
grid (its minimum is the dual value the loss must equal), the reference DRO loss's autograd
gradient at fixed tau*, and central differences of the dual value itself (the envelope theorem).
TP=2 runs in tests/parallel/test_tempnet_tp.py.
"""
import math

import pytest
import torch

from megatron_tempnet.tempnet import dro_loss_per_token, dro_loss_per_token_reference, solve_tau
from megatron_tempnet.tempnet.exact_tau import KL_TOL

TAU_MIN, TAU_MAX = 0.5, 5.0


def kl_to_uniform(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """KL(softmax(z / tau) || uniform) [...] in float64."""
    logp = torch.log_softmax(z.double() / tau.double().unsqueeze(-1), dim=-1)
    return math.log(z.shape[-1]) + (logp.exp() * logp).sum(-1)


def tempered_var(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Var_{p_tau}(z / tau) [...] in float64: minus the slope of KL in log(tau)."""
    u = z.double() / tau.double().unsqueeze(-1)
    p = torch.softmax(u, dim=-1)
    mean = (p * u).sum(-1, keepdim=True)
    return (p * (u - mean) ** 2).sum(-1)


def interior_rho(z: torch.Tensor, seed: int) -> float:
    """A rho whose root lies inside [TAU_MIN, TAU_MAX] for about half of the rows: the median
    KL at a random temperature per row."""
    gen = torch.Generator().manual_seed(seed)
    tau = torch.empty(z.shape[:-1], dtype=torch.float64).uniform_(TAU_MIN, TAU_MAX,
                                                                  generator=gen)
    return float(kl_to_uniform(z, tau).median())


def kl_tolerance(z, tau, dtype):
    """|KL(p_tau*) - rho| allowed: the solver's tolerance plus the compute dtype's resolution of
    KL (its evaluation sums V terms of size up to |z/tau|; float64 needs no such margin)."""
    if dtype == torch.float64:
        return 1e-9
    return 2 * KL_TOL[torch.float32] + 1e-6 * (1 + tempered_var(z, tau))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
@pytest.mark.parametrize("vocab", [7, 101, 1999])
def test_kl_of_tau_star_is_rho(dtype, scale, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(5, 7, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    rho = interior_rho(z, seed)
    tau = solve_tau(z, rho, TAU_MIN, TAU_MAX)
    where = f"seed {seed}, scale {scale}, V {vocab}, rho {rho}"
    assert tau.shape == (5, 7) and tau.dtype == dtype, where
    assert torch.all((tau >= TAU_MIN) & (tau <= TAU_MAX)), where
    kl = kl_to_uniform(z, tau)
    inside = (tau > TAU_MIN) & (tau < TAU_MAX)
    assert inside.sum() >= 10, where  # the test is about roots, not bounds
    err = (kl - rho).abs()
    tol = kl_tolerance(z, tau, dtype)
    assert torch.all(torch.where(inside, err <= tol, True)), (where, err[inside].max())
    # rows at a bound: no root inside (KL is decreasing in tau)
    at_min, at_max = tau == TAU_MIN, tau == TAU_MAX
    assert torch.all(torch.where(at_min, kl <= rho + tol, True)), where
    assert torch.all(torch.where(at_max, kl >= rho - tol, True)), where


def test_clamps_to_the_bounds_when_no_root_lies_inside():
    gen = torch.Generator().manual_seed(0)
    vocab = 53
    z = torch.randn(6, vocab, generator=gen) * 2
    log_v = math.log(vocab)
    # KL < log V always: KL = rho is never reached, dl/dtau = rho - KL > 0, the minimum is tau_min
    assert torch.all(solve_tau(z, log_v, TAU_MIN, TAU_MAX) == TAU_MIN)
    assert torch.all(solve_tau(z, log_v + 3.0, TAU_MIN, TAU_MAX) == TAU_MIN)
    # rho = 0: KL > 0 at every finite tau, the minimum is tau_max
    assert torch.all(solve_tau(z, 0.0, TAU_MIN, TAU_MAX) == TAU_MAX)
    # rho just above KL(tau_min) / just below KL(tau_max)
    kl_lo = kl_to_uniform(z, torch.full((6,), TAU_MIN))
    kl_hi = kl_to_uniform(z, torch.full((6,), TAU_MAX))
    assert torch.all(solve_tau(z, float(kl_lo.max()) + 1e-3, TAU_MIN, TAU_MAX) == TAU_MIN)
    assert torch.all(solve_tau(z, float(kl_hi.min()) - 1e-3, TAU_MIN, TAU_MAX) == TAU_MAX)
    # constant rows (KL = 0 at every tau) -> tau_min; one-hot-like rows (KL ~ log V) -> tau_max
    special = torch.zeros(3, vocab)
    special[1, 4] = 1e4
    special[2, 0], special[2, 9] = 1e4, 1e4  # two tied maxima: KL ~ log V - log 2
    tau = solve_tau(special, 2.0, TAU_MIN, TAU_MAX)
    assert tau.tolist() == [TAU_MIN, TAU_MAX, TAU_MAX]
    assert solve_tau(special[2:], log_v - math.log(2) + 1e-3, TAU_MIN, TAU_MAX).item() == TAU_MIN


def dual_value_on_grid(z, target, rho, points=4001):
    """min over a log-spaced tau grid (bounds included) of l(z, y, tau), float64 [rows]."""
    z = z.double()
    grid = torch.logspace(math.log10(TAU_MIN), math.log10(TAU_MAX), points, dtype=torch.float64)
    best = torch.full(z.shape[:-1], math.inf, dtype=torch.float64)
    for chunk in grid.split(500):
        tau = chunk.view(-1, 1)  # [G, 1] against rows [1, t]
        lse = torch.logsumexp(z.unsqueeze(0) / tau.unsqueeze(-1), dim=-1)  # [G, t]
        z_y = z.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        loss = tau * lse - z_y + (rho - math.log(z.shape[-1])) * tau  # tau * CE(z/tau) + ...
        best = torch.minimum(best, loss.amin(0))
    return best


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_is_the_dro_dual_value(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    vocab = 211
    z = torch.cat([torch.randn(24, vocab, generator=gen, dtype=torch.float64) * s
                   for s in (0.5, 2.0, 6.0)]).to(dtype)  # [72, V]: interior and clamped rows
    target = torch.randint(0, vocab, (72,), generator=gen)
    rho = interior_rho(z, seed)
    tau = solve_tau(z, rho, TAU_MIN, TAU_MAX)
    loss, _, _ = dro_loss_per_token(z, target, tau, rho)
    grid_min = dual_value_on_grid(z, target, rho)
    where = f"seed {seed}, {dtype}, rho {rho}"
    assert 0 < ((tau > TAU_MIN) & (tau < TAU_MAX)).sum() < 72, where
    # never above the grid minimum; below it only by the grid's resolution (l is smooth and its
    # minimum may fall between grid points: 0.5 * l'' * (half spacing)^2 ~ 1e-5 here)
    tol = 1e-9 if dtype == torch.float64 else 2e-5 * (1 + grid_min.abs())
    assert torch.all(loss.double() <= grid_min + tol), (where, (loss - grid_min).max())
    assert torch.all(loss.double() >= grid_min - 1e-4), (where, (grid_min - loss).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_is_the_reference_gradient_at_fixed_tau_star(dtype):
    gen = torch.Generator().manual_seed(3)
    vocab = 97
    z = (torch.randn(4, 9, vocab, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, vocab, (4, 9), generator=gen)
    rho = interior_rho(z, 3)
    weights = torch.rand(4, 9, generator=gen, dtype=dtype)

    ours = z.clone().requires_grad_(True)
    tau = solve_tau(ours, rho, TAU_MIN, TAU_MAX)
    assert not tau.requires_grad
    loss, _, _ = dro_loss_per_token(ours, target, tau, rho)
    (loss * weights).sum().backward()

    ref = z.clone().requires_grad_(True)
    ref_loss, _, _ = dro_loss_per_token_reference(ref, target, tau, rho)
    (ref_loss * weights).sum().backward()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss.to(dtype), **tol)
    torch.testing.assert_close(ours.grad, ref.grad, **tol)


def test_gradient_is_the_derivative_of_the_dual_value():
    """Envelope theorem: d/dz min_tau l(z, y, tau) = dl/dz at tau* (interior and clamped rows),
    checked by central differences of the solved loss along random directions (float64)."""
    gen = torch.Generator().manual_seed(11)
    vocab = 61
    z = torch.randn(40, vocab, generator=gen, dtype=torch.float64)
    z = z * torch.tensor([0.3, 2.5, 8.0], dtype=torch.float64).repeat_interleave(14)[:40, None]
    target = torch.randint(0, vocab, (40,), generator=gen)
    rho = interior_rho(z, 11)

    def dual(logits):
        return dro_loss_per_token(logits, target, solve_tau(logits, rho, TAU_MIN, TAU_MAX),
                                  rho)[0]

    leaf = z.clone().requires_grad_(True)
    dual(leaf).sum().backward()
    tau = solve_tau(z, rho, TAU_MIN, TAU_MAX)
    assert 0 < ((tau > TAU_MIN) & (tau < TAU_MAX)).sum() < 40
    eps = 1e-6
    for _ in range(3):
        direction = torch.randn(z.shape, generator=gen, dtype=torch.float64)
        numeric = (dual(z + eps * direction) - dual(z - eps * direction)) / (2 * eps)  # [rows]
        analytic = (leaf.grad * direction).sum(-1)
        torch.testing.assert_close(numeric, analytic, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits(dtype):
    gen = torch.Generator().manual_seed(5)
    vocab = 129
    base = torch.randn(16, vocab, generator=gen, dtype=torch.float64)
    rho = interior_rho(base, 5)
    tau = solve_tau(base.to(dtype), rho, TAU_MIN, TAU_MAX)
    # joint scaling of logits and bounds by 1e4 leaves KL unchanged: tau* scales exactly
    big = solve_tau((base * 1e4).to(dtype), rho, TAU_MIN * 1e4, TAU_MAX * 1e4)
    rtol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(big, tau * 1e4, rtol=rtol, atol=0)
    # magnitude 1e4 at the usual bounds: every row is near one-hot (KL ~ log V > rho): tau_max
    huge = (base * 1e4).to(dtype)
    assert torch.all(solve_tau(huge, rho, TAU_MIN, TAU_MAX) == TAU_MAX)
    target = torch.randint(0, vocab, (16,), generator=gen)
    loss, ce, _ = dro_loss_per_token(huge, target, solve_tau(huge, rho, TAU_MIN, TAU_MAX), rho)
    assert torch.all(torch.isfinite(loss)) and torch.all(torch.isfinite(ce))
    # an offset of 1e4 (the max is subtracted first): the same tau* as the shifted values
    shifted = (base * 3 + 1e4).to(dtype)
    exact = solve_tau(shifted.double() - 1e4, rho, TAU_MIN, TAU_MAX)
    torch.testing.assert_close(solve_tau(shifted, rho, TAU_MIN, TAU_MAX).double(), exact,
                               rtol=1e-10 if dtype == torch.float64 else 2e-3, atol=0)


def test_low_precision_input_computes_in_fp32_and_leaves_the_input_alone():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(3, 5, 64, generator=gen).to(torch.bfloat16)
    before = z.clone()
    tau = solve_tau(z, 2.0, TAU_MIN, TAU_MAX)
    assert tau.dtype == torch.float32 and torch.equal(z, before)
    torch.testing.assert_close(tau, solve_tau(z.float(), 2.0, TAU_MIN, TAU_MAX), rtol=0, atol=0)
    with pytest.raises(ValueError, match="tau_min < tau_max"):
        solve_tau(z, 2.0, 1.0, 1.0)


def test_evaluation_reports_the_perplexity_at_tau_star(single_process):
    """training/evaluate.py: a "dro_exact" model's own tau is tau*, per token."""
    from batches import random_batches
    from megatron_tempnet.config import load_model_preset
    from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
    from megatron_tempnet.tempnet import TempNetConfig
    from megatron_tempnet.training.config import EvalConfig
    from megatron_tempnet.training.evaluate import evaluate, format_eval_table

    torch.manual_seed(0)
    cfg = load_model_preset("tiny-llama", vocab_size=200)  # padded to 256
    model = build_tempnet_model(cfg, TempNetConfig(loss_mode="dro_exact", rho=1.0), single_process)
    with torch.no_grad():
        model.output_layer.weight.mul_(20.0)  # logits of scale ~3: roots inside the bounds
    batches = random_batches(cfg.vocab_size, 2, 2, 16, 4)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b["tokens"], b["position_ids"], None) for b in batches])
    model.train()
    labels, mask = (torch.cat([b[k] for b in batches]) for k in ("labels", "loss_mask"))
    tau = solve_tau(logits, 1.0, TAU_MIN, TAU_MAX)  # [b, s], checked on its own above
    inside = (tau > TAU_MIN) & (tau < TAU_MAX)
    assert inside.any() and torch.all((kl_to_uniform(logits, tau) - 1.0)[inside].abs() < 1e-4)

    result = evaluate([model], iter(batches), 1, single_process, seq_length=16,
                      micro_batch_size=2, num_microbatches=2, config=EvalConfig(refine_points=0))
    logp = torch.log_softmax(logits.double() / tau.double().unsqueeze(-1), dim=-1)
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    keep = mask > 0
    assert math.isclose(result["ppl exact tau"], math.exp(float(nll[keep].mean())), rel_tol=1e-5)
    assert math.isclose(result["tau mean"], float(tau[keep].double().mean()), rel_tol=1e-5)
    assert sum(result["tau histogram"]["counts"]) == float(mask.sum())
    assert "ppl tempnet" not in result and "fixed tau" not in result
    assert "exact tau* (mean" in format_eval_table(result)
