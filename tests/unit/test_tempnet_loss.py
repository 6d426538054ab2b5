"""The DRO loss (docs/tempnet_math.md section 1) against a dense float64 autograd reference and the
analytic gradients; masking, shapes and numerical stability. Single process (tp_group None).

Fresh random inputs every run: the seed is printed (shown by pytest on failure); set
TEMPNET_TEST_SEED to replay one.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_tempnet.tempnet import (dro_loss, dro_loss_per_token, dro_loss_per_token_reference,
                                      dro_loss_reference)

# named tolerances per dtype of the logits (computation is fp32 for fp32/bf16, fp64 for fp64)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=1e-5, atol=1e-5)}  # fp32 compute; bf16 only rounds the inputs
GRAD_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10),
            torch.float32: dict(rtol=1e-5, atol=1e-6),
            torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3)}  # logits grads come back in bf16
VOCAB = 37  # odd on purpose
STATS = ("dro_loss", "ce", "tempered_ce", "tau_mean", "tau_min", "tau_max", "num_tokens")


def make_case(seed, shape=(5, 3), vocab=VOCAB, scale=3.0, tau_range=(0.3, 4.0)):
    """float64 logits [*shape, V], target, tau, loss_mask (~30% masked, never all) and rho."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, vocab, shape, generator=g)
    lo, hi = tau_range
    tau = lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(shape, generator=g) > 0.3).float()
    mask.view(-1)[0] = 1.0
    rho = float(torch.rand((), generator=g, dtype=torch.float64)) * 5.0
    return logits, target, tau, mask, rho


def run(fn, logits, target, tau, mask, rho, grad_logits=True, **kwargs):
    """loss, stats and (logits grad, tau grad) of fn = dro_loss or dro_loss_reference."""
    logits = logits.detach().clone().requires_grad_(grad_logits)
    tau = tau.detach().clone().requires_grad_(True)
    loss, stats = fn(logits, target, tau, mask, rho, **kwargs)
    loss.backward()
    return loss.detach(), stats, logits.grad, tau.grad


# objective "tempered_ce" (TempNet without DRO): loss = CE(z/tau, y)
@pytest.mark.parametrize("objective", ["dro", "tempered_ce"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_loss_stats_and_grads_match_dense_reference(seed, dtype, objective):
    logits, target, tau, mask, rho = make_case(seed)
    logits = logits.to(dtype)
    tau_in = tau if dtype == torch.float64 else tau.float()
    loss, stats, g_z, g_tau = run(dro_loss, logits, target, tau_in, mask, rho,
                                  objective=objective)
    # oracle: float64 autograd on the same (possibly rounded) inputs
    r_loss, r_stats, r_g_z, r_g_tau = run(dro_loss_reference, logits.double(), target,
                                          tau_in.double(), mask, rho, objective=objective)
    where = f"dtype {dtype}, {objective}, seed {seed}"
    torch.testing.assert_close(loss.double(), r_loss, **TOL[dtype], msg=where)
    if objective == "tempered_ce":
        torch.testing.assert_close(stats["tempered_ce"].double(), r_loss, **TOL[dtype],
                                   msg=where)
    for key in STATS:
        torch.testing.assert_close(stats[key].double(), r_stats[key], **TOL[dtype],
                                   msg=f"{key}: {where}")
    assert g_z.dtype == dtype
    torch.testing.assert_close(g_z.double(), r_g_z, **GRAD_TOL[dtype], msg=where)
    torch.testing.assert_close(g_tau.double(), r_g_tau, **TOL[dtype], msg=where)


def test_grads_are_the_analytic_ones(seed):
    """dl/dz = p_tau - onehot(y) (no 1/tau), dl/dtau = rho - KL(p_tau || u), per token."""
    logits, target, tau, _, rho = make_case(seed)
    z = logits.clone().requires_grad_(True)
    t = tau.clone().requires_grad_(True)
    loss, _, _ = dro_loss_per_token(z, target, t, rho)
    loss.sum().backward()
    p = torch.softmax(logits / tau.unsqueeze(-1), dim=-1)
    onehot = F.one_hot(target, VOCAB).double()
    kl = (p * torch.log(p * VOCAB)).sum(-1)
    torch.testing.assert_close(z.grad, p - onehot, **GRAD_TOL[torch.float64], msg=f"seed {seed}")
    torch.testing.assert_close(t.grad, rho - kl, **GRAD_TOL[torch.float64], msg=f"seed {seed}")


def test_tau_grad_does_not_depend_on_the_label(seed):
    logits, target, tau, mask, rho = make_case(seed)
    other = (target + 1 + torch.randint(0, VOCAB - 1, target.shape)) % VOCAB
    assert bool((other != target).all())
    _, _, _, g1 = run(dro_loss, logits, target, tau, mask, rho)
    _, _, _, g2 = run(dro_loss, logits, other, tau, mask, rho)
    torch.testing.assert_close(g1, g2, **GRAD_TOL[torch.float64], msg=f"seed {seed}")


def test_tau_one_is_cross_entropy_plus_a_constant(seed):
    logits, target, _, mask, rho = make_case(seed)
    ones = torch.ones(target.shape, dtype=torch.float64)
    loss, ce, tempered = dro_loss_per_token(logits, target, ones, rho)
    plain = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1),
                            reduction="none").view(target.shape)
    tol = TOL[torch.float64]
    torch.testing.assert_close(loss, plain + rho - math.log(VOCAB), **tol, msg=f"seed {seed}")
    torch.testing.assert_close(ce, plain, **tol)
    torch.testing.assert_close(tempered, plain, **tol)
    # and the gradient is ordinary CE's
    z = logits.clone().requires_grad_(True)
    dro_loss(z, target, ones, mask, rho)[0].backward()
    z2 = logits.clone().requires_grad_(True)
    ((F.cross_entropy(z2.reshape(-1, VOCAB), target.reshape(-1), reduction="none")
      * mask.reshape(-1)).sum() / mask.sum()).backward()
    torch.testing.assert_close(z.grad, z2.grad, **GRAD_TOL[torch.float64])


def test_masked_tokens_change_nothing(seed):
    logits, target, tau, mask, rho = make_case(seed)
    masked = mask == 0
    assert bool(masked.any())
    base = run(dro_loss, logits, target, tau, mask, rho)
    logits2, target2, tau2 = logits.clone(), target.clone(), tau.clone()
    logits2[masked] = torch.randn(int(masked.sum()), VOCAB, dtype=torch.float64) * 100
    target2[masked] = -100  # ignore_index style targets are fine on masked tokens
    tau2[masked] = 0.01
    other = run(dro_loss, logits2, target2, tau2, mask, rho)
    for a, b in zip(base[:1] + base[2:], other[:1] + other[2:]):
        assert torch.equal(a, b), f"seed {seed}"
    for key in STATS:
        assert torch.equal(base[1][key], other[1][key]), (key, seed)
    assert torch.count_nonzero(other[2][masked]) == 0 and torch.count_nonzero(other[3][masked]) == 0


def test_all_masked_batch_is_zero_not_nan(seed):
    logits, target, tau, mask, rho = make_case(seed)
    loss, stats, g_z, g_tau = run(dro_loss, logits, target, tau, torch.zeros_like(mask), rho)
    assert loss == 0 and stats["num_tokens"] == 0
    assert torch.count_nonzero(g_z) == 0 and torch.count_nonzero(g_tau) == 0


@pytest.mark.parametrize("shape", [(1, 1), (1,), (4, 1, 2)])
def test_leading_shapes_and_single_token(seed, shape):
    logits, target, tau, mask, rho = make_case(seed, shape=shape)
    mask = torch.ones_like(mask)
    ours = run(dro_loss, logits, target, tau, mask, rho)
    flat = run(dro_loss, logits.reshape(-1, VOCAB), target.reshape(-1), tau.reshape(-1),
               mask.reshape(-1), rho)
    ref = run(dro_loss_reference, logits, target, tau, mask, rho)
    tol = GRAD_TOL[torch.float64]
    for a, b, r in zip((ours[0], ours[2], ours[3]), (flat[0], flat[2], flat[3]),
                       (ref[0], ref[2], ref[3])):
        torch.testing.assert_close(a.reshape(-1), b.reshape(-1), **tol)
        torch.testing.assert_close(a, r, **tol, msg=f"shape {shape}, seed {seed}")


@pytest.mark.parametrize("tau_value", [0.01, 1.0, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_of_magnitude_1e4(seed, dtype, tau_value):
    logits, target, tau, mask, rho = make_case(seed, scale=1e4)
    logits = logits.to(dtype)
    tau = torch.full(target.shape, tau_value)
    loss, stats, g_z, g_tau = run(dro_loss, logits, target, tau, mask, rho)
    values = [loss, g_z.float(), g_tau] + [stats[k] for k in STATS if k != "tau_min"]
    assert all(bool(torch.isfinite(v).all()) for v in values), f"seed {seed}"
    r_loss, r_stats, r_g_z, r_g_tau = run(dro_loss_reference, logits.double(), target,
                                          tau.double(), mask, rho)
    where = f"dtype {dtype}, tau {tau_value}, seed {seed}"
    torch.testing.assert_close(loss.double(), r_loss, rtol=1e-5, atol=1e-5, msg=where)
    torch.testing.assert_close(stats["ce"].double(), r_stats["ce"], rtol=1e-5, atol=1e-5)
    # each gradient row is p_tau - onehot: it sums to 0 (a masked row is 0)
    row_sums = g_z.float().sum(-1)
    torch.testing.assert_close(row_sums, torch.zeros_like(row_sums), rtol=0, atol=2e-2)
    if tau_value >= 1.0:  # z/tau exactly representable enough in fp32 for a tight comparison
        torch.testing.assert_close(g_z.double(), r_g_z, **GRAD_TOL[dtype], msg=where)
        torch.testing.assert_close(g_tau.double(), r_g_tau, rtol=1e-4, atol=1e-5, msg=where)


def test_frozen_logits_still_train_tau(seed):
    """Mode (c): the LM is frozen, only tau (TempNet) gets a gradient."""
    logits, target, tau, mask, rho = make_case(seed)
    loss, _, g_z, g_tau = run(dro_loss, logits, target, tau, mask, rho, grad_logits=False)
    _, _, _, r_g_tau = run(dro_loss_reference, logits, target, tau, mask, rho)
    assert g_z is None
    torch.testing.assert_close(g_tau, r_g_tau, **GRAD_TOL[torch.float64])


def test_reference_per_token_matches_parallel_per_token(seed):
    """The two per-token entry points agree (the dispatch point the fused kernels plug into)."""
    logits, target, tau, _, rho = make_case(seed)
    for a, b in zip(dro_loss_per_token(logits, target, tau, rho),
                    dro_loss_per_token_reference(logits, target, tau, rho)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_shape_errors_are_clear():
    logits = torch.randn(3, 2, VOCAB)
    with pytest.raises(ValueError, match=r"target and tau of shape \(3, 2\)"):
        dro_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.ones(3, 2), torch.ones(3, 2),
                 1.0)
    with pytest.raises(ValueError, match="loss_mask"):
        dro_loss(logits, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), torch.ones(6), 1.0)


def test_tempered_ce_grads_are_the_analytic_ones(seed):
    """dl/dz = (p_tau - onehot(y)) / tau, dl/dtau = (z_y - E_p[z]) / tau^2, per token."""
    logits, target, tau, _, rho = make_case(seed)
    z = logits.clone().requires_grad_(True)
    t = tau.clone().requires_grad_(True)
    loss, _, tempered = dro_loss_per_token(z, target, t, rho, objective="tempered_ce")
    torch.testing.assert_close(loss.detach(), tempered, rtol=0, atol=0)
    loss.sum().backward()
    p = torch.softmax(logits / tau.unsqueeze(-1), dim=-1)
    onehot = F.one_hot(target, VOCAB).double()
    z_y = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    expected_tau = (z_y - (p * logits).sum(-1)) / tau ** 2
    torch.testing.assert_close(z.grad, (p - onehot) / tau.unsqueeze(-1),
                               **GRAD_TOL[torch.float64], msg=f"seed {seed}")
    torch.testing.assert_close(t.grad, expected_tau, **GRAD_TOL[torch.float64], msg=f"seed {seed}")


def test_unknown_objective_is_refused():
    logits, target, tau, _, rho = make_case(0)
    with pytest.raises(ValueError, match="objective 'ce'"):
        dro_loss_per_token(logits, target, tau, rho, objective="ce")
