"""TempNetHead (docs/tempnet_math.md section 2) against the dense float64 reference: tau, every
parameter's gradient (also through the DRO loss), gradcheck, dropout, initialisation, bounds.
Single process (tp_group None); tests/parallel/test_tempnet_tp.py covers TP=2.

Fresh random inputs every run: the seed is printed (shown by pytest on failure); set
TEMPNET_TEST_SEED to replay one.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from megatron_tempnet.tempnet import (PARAM_NAMES, TempNetConfig, TempNetHead, dro_loss,
                                      dro_loss_reference, full_init_params, tempnet_reference)

FP64_TOL = dict(rtol=1e-10, atol=1e-12)
FP32_TOL = dict(rtol=1e-5, atol=1e-6)
VOCAB, HIDDEN = 41, 13  # odd on purpose
CONVENTIONS = ("raw", "max_shifted")


def make_head(seed, convention="raw", dtype=torch.float64, perturb=True, **cfg):
    """A head in `dtype` whose pooling parameters are moved off their init (generic grads)."""
    config = TempNetConfig(hidden_size=HIDDEN, input_convention=convention, **cfg)
    head = TempNetHead(config, VOCAB, seed=seed, dtype=dtype)
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            head.pool_scale.fill_(float(torch.randn((), generator=g)) * 0.5)
            head.pool_w.add_(torch.randn(HIDDEN, generator=g, dtype=dtype))
            head.pool_c.fill_(float(torch.randn((), generator=g)))
            head.w1.mul_(30.0)  # larger pre-activations than at init: sigmoid off its linear part
    return head


def params_of(head):
    return dict(head.named_parameters())


def test_init_is_as_specified(seed):
    cfg = TempNetConfig(hidden_size=HIDDEN)
    full = full_init_params(cfg, VOCAB, seed)
    head = TempNetHead(cfg, VOCAB, seed=seed)
    assert [n for n, _ in head.named_parameters()] == list(PARAM_NAMES)
    for name in PARAM_NAMES:
        assert torch.equal(getattr(head, name), full[name]), name
    assert head.pool_scale.shape == () and float(head.pool_scale) == 0.0
    assert head.pool_c.shape == () and float(head.pool_c) == 0.0
    assert torch.equal(head.pool_w, torch.ones(HIDDEN))
    assert float(head.w1.abs().max()) <= 1 / math.sqrt(VOCAB)
    assert float(head.w2.abs().max()) <= 1 / math.sqrt(HIDDEN)
    assert float(head.w1.std()) > 0.5 / math.sqrt(3 * VOCAB)  # U(+-1/sqrt(V)): std 1/sqrt(3V)
    assert head.w1.tensor_model_parallel and head.w1.partition_dim == 1 \
        and head.w1.partition_stride == 1
    assert not getattr(head.w2, "tensor_model_parallel", False)
    # TP ranks slice the same full W1 and share the replicated parameters
    shards = [TempNetHead(cfg, VOCAB + 1, tp_rank=r, tp_size=2, seed=seed) for r in range(2)]
    full2 = full_init_params(cfg, VOCAB + 1, seed)
    assert torch.equal(torch.cat([s.w1 for s in shards], dim=1), full2["w1"])
    for name in PARAM_NAMES[1:]:
        assert torch.equal(getattr(shards[0], name), getattr(shards[1], name)), name
    assert not torch.equal(TempNetHead(cfg, VOCAB, seed=seed + 1).w1, head.w1)


@pytest.mark.parametrize("chunk_elements", [None, 50])  # 50: row by row (VOCAB > 50 / 2)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_tau_and_param_grads_match_reference(seed, convention, chunk_elements, monkeypatch):
    if chunk_elements:  # W1 z and its backward in row chunks of the logits
        monkeypatch.setattr("megatron_tempnet.tempnet.head.CHUNK_ELEMENTS", chunk_elements)
    head = make_head(seed, convention).eval()
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 3, VOCAB, generator=g, dtype=torch.float64) * 5
    upstream = torch.randn(4, 3, generator=g, dtype=torch.float64)
    tau = head(logits)
    ref_params = {k: v.detach().clone().requires_grad_(True) for k, v in params_of(head).items()}
    ref_tau = tempnet_reference(logits, ref_params, head.config)
    where = f"{convention}, seed {seed}"
    torch.testing.assert_close(tau, ref_tau, **FP64_TOL, msg=where)
    ours = torch.autograd.grad(tau, list(params_of(head).values()), upstream)
    theirs = torch.autograd.grad(ref_tau, list(ref_params.values()), upstream)
    for name, a, b in zip(PARAM_NAMES, ours, theirs):
        torch.testing.assert_close(a, b, **FP64_TOL, msg=f"{name}: {where}")


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_gradcheck(seed, convention):
    head = make_head(seed, convention).eval()
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64) * 3
    names = list(PARAM_NAMES)

    def fn(*values):
        return functional_call(head, dict(zip(names, values)), (logits,))

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in head.parameters())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_head_through_dro_loss_matches_reference(seed):
    """The whole path: logits -> TempNet tau -> DRO loss; grads of logits and head params."""
    head = make_head(seed).eval()
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 2, VOCAB, generator=g, dtype=torch.float64) * 4
    target = torch.randint(0, VOCAB, (5, 2), generator=g)
    mask = (torch.rand(5, 2, generator=g) > 0.3).double()
    mask[0, 0] = 1
    rho = 2.5

    z = logits.clone().requires_grad_(True)
    loss, stats = dro_loss(z, target, head(z), mask, rho)
    loss.backward()

    ref_params = {k: v.detach().clone().requires_grad_(True) for k, v in params_of(head).items()}
    z_ref = logits.clone().requires_grad_(True)
    r_loss, r_stats = dro_loss_reference(z_ref, target, tempnet_reference(z_ref, ref_params,
                                                                          head.config), mask, rho)
    r_loss.backward()
    where = f"seed {seed}"
    torch.testing.assert_close(loss, r_loss, **FP64_TOL, msg=where)
    for key, value in r_stats.items():
        torch.testing.assert_close(stats[key], value, **FP64_TOL, msg=f"{key}: {where}")
    # no gradient reaches the LM through TempNet: the logits' grad is p_tau - onehot only
    torch.testing.assert_close(z.grad, z_ref.grad, **FP64_TOL, msg=where)
    for name, p in params_of(head).items():
        torch.testing.assert_close(p.grad, ref_params[name].grad, **FP64_TOL,
                                   msg=f"{name}: {where}")


def test_dropout_is_the_default_generators_mask(seed):
    head = make_head(seed, dtype=torch.float32).train()
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(seed))
    state = torch.get_rng_state()
    tau = head(logits)
    torch.set_rng_state(state)  # the same generator state draws the same mask
    mask = F.dropout(torch.ones(6, HIDDEN), p=head.config.dropout, training=True)
    torch.set_rng_state(state)
    assert torch.equal(head(logits), tau)  # deterministic given the generator state
    ref = tempnet_reference(logits, params_of(head), head.config, dropout_mask=mask)
    torch.testing.assert_close(tau, ref, **FP32_TOL, msg=f"seed {seed}")
    assert not torch.allclose(ref, tempnet_reference(logits, params_of(head), head.config))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tau_stays_within_bounds(seed, dtype):
    cfg = dict(tau_min=0.01, tau_max=2.0)
    head = make_head(seed, dtype=torch.float32, **cfg).eval()
    g = torch.Generator().manual_seed(seed)
    cases = [torch.randn(8, VOCAB, generator=g) * 1e4, torch.zeros(2, VOCAB),
             torch.full((2, VOCAB), -3e4), torch.randn(1, VOCAB, generator=g)]
    for extreme in (1.0, 1e3):
        with torch.no_grad():
            head.pool_w.mul_(extreme)
            head.w2.mul_(extreme)
        for logits in cases:
            tau = head(logits.to(dtype))
            assert bool(torch.isfinite(tau).all()), (extreme, seed)
            assert bool(((tau >= 0.01) & (tau <= 2.0)).all()), (tau, extreme, seed)


def test_logits_are_detached(seed):
    head = make_head(seed, dtype=torch.float32).eval()
    logits = torch.randn(3, VOCAB, requires_grad=True)
    head(logits).sum().backward()
    assert logits.grad is None and head.w1.grad is not None


def test_max_shifted_is_shift_invariant(seed):
    head = make_head(seed, "max_shifted").eval()
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)
    shift = torch.randn(4, 1, dtype=torch.float64) * 50
    torch.testing.assert_close(head(logits + shift), head(logits), rtol=1e-9, atol=1e-9)
    raw = make_head(seed, "raw").eval()
    assert not torch.allclose(raw(logits + shift), raw(logits))


def test_shape_and_layout_errors_are_clear():
    head = TempNetHead(TempNetConfig(hidden_size=HIDDEN), VOCAB + 1, tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match="built for TP=2"):
        head(torch.randn(3, (VOCAB + 1) // 2))  # no group: a TP=1 call on a TP=2 head
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 2"):
        TempNetHead(TempNetConfig(), VOCAB, tp_size=2)
