"""The two TempNet designs (--tempnet-arch): the paper's midpoint floor and scale blindness, and the
scale_aware head against its dense float64 reference (tau, every gradient, dropout), its tau0
start with both directions reachable, its scale sensitivity, its config errors, the checkpoint
check between designs, and a frozen-logits training where tau* is known (single process;
tests/parallel/test_tempnet_model_parity.py covers TP=2 / PP=2, tests/unit/test_hf_tempnet.py the
export).

Fresh random inputs every run: the seed is printed (shown by pytest on failure); set
TEMPNET_TEST_SEED to replay one.
"""
import math

import pytest
import torch

from megatron_tempnet.config import ConfigError
from megatron_tempnet.tempnet import (SCALE_AWARE_PARAM_NAMES, ScaleAwareTempNetHead,
                                      TempNetConfig, TempNetHead, build_tempnet_head,
                                      dro_loss_per_token, scale_aware_reference, solve_tau)
from megatron_tempnet.tempnet.head import SCALE_AWARE_FEATURES, scale_aware_init_params
from megatron_tempnet.training.run_record import shape_mismatches

FP64_TOL = dict(rtol=1e-10, atol=1e-12)
VOCAB, HIDDEN = 43, 11  # odd on purpose


def scale_aware(seed, perturb=True, dtype=torch.float64, **cfg):
    config = TempNetConfig(arch="scale_aware", loss_mode="tempnet_dro", hidden_size=HIDDEN,
                           rho=1.5, **cfg)
    head = ScaleAwareTempNetHead(config, VOCAB, seed=seed, dtype=dtype)
    if perturb:  # the output layer off its zero init: every path carries gradient
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in head.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    return head


def random_logits(seed, rows=24, dtype=torch.float64):
    """Rows of very different scales and shapes (a few spiked tokens), one constant row."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(rows, dtype=dtype).uniform_(-2.0, 2.5, generator=g))
    z = torch.randn(rows, VOCAB, generator=g, dtype=dtype)
    z[:, :3] += torch.rand(rows, 1, generator=g, dtype=dtype) * 5
    z = z * scale[:, None] + torch.randn(rows, 1, generator=g, dtype=dtype) * 10  # + a shift
    z[0] = 3.0
    return z


def r_squared(pred, target):
    return float(1 - ((pred - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())


# --- the paper's design: the structural causes measured in the issue -------------------------

@pytest.mark.parametrize("convention", ["raw", "max_shifted"])
def test_paper_design_has_the_midpoint_floor_at_init(seed, convention):
    """pool_w = 1: o - c = sum (a_j - 1/M) h_j >= 0 (Chebyshev), so tau >= the midpoint."""
    cfg = TempNetConfig(hidden_size=HIDDEN, input_convention=convention, loss_mode="tempnet_dro")
    head = TempNetHead(cfg, VOCAB, seed=seed, dtype=torch.float64).eval()
    with torch.no_grad():
        head.w1.mul_(50.0)  # even with a strongly input-dependent hidden layer
    z = random_logits(seed, rows=200)
    tau = head(z).detach()
    assert float(tau.min()) >= (cfg.tau_min + cfg.tau_max) / 2 - 1e-12


def test_paper_design_is_blind_to_the_logit_scale(seed):
    head = TempNetHead(TempNetConfig(hidden_size=HIDDEN, loss_mode="tempnet_dro"), VOCAB,
                       seed=seed, dtype=torch.float64).eval()
    z = random_logits(seed)
    torch.testing.assert_close(head(3.0 * z), head(z), **FP64_TOL)


# --- the scale_aware design ------------------------------------------------------------------

def test_scale_aware_init_starts_at_tau0_for_every_input(seed):
    for tau0, bounds in ((1.0, (0.5, 5.0)), (0.3, (0.05, 2.0)), (1.7, (1.1, 4.0))):
        head = scale_aware(seed, perturb=False, tau0=tau0, tau_min=bounds[0], tau_max=bounds[1])
        assert [n for n, _ in head.named_parameters()] == list(SCALE_AWARE_PARAM_NAMES)
        full = scale_aware_init_params(head.config, VOCAB, seed)
        for name in SCALE_AWARE_PARAM_NAMES:
            assert torch.equal(getattr(head, name), full[name].double()), name
        tau = head(random_logits(seed, rows=100)).detach()
        torch.testing.assert_close(tau, torch.full_like(tau, tau0), rtol=1e-12, atol=0)
    assert head.w_dir.tensor_model_parallel and head.w_dir.partition_dim == 1
    # the default tau0: 1 inside the bounds, else their geometric mean
    assert TempNetConfig(arch="scale_aware").initial_tau == 1.0
    assert TempNetConfig(arch="scale_aware", tau_min=2.0, tau_max=8.0).initial_tau == 4.0
    assert TempNetConfig(arch="scale_aware", tau0=0.7).initial_tau == 0.7
    cfg = TempNetConfig(arch="scale_aware")
    assert cfg.dropout == 0.0 and cfg.lr == 1e-3
    assert TempNetConfig().dropout == 0.5 and TempNetConfig().lr == 2e-6  # the paper's
    # TP ranks slice one full w_dir and share the rest
    shards = [ScaleAwareTempNetHead(cfg, VOCAB + 1, tp_rank=r, tp_size=2, seed=seed)
              for r in range(2)]
    assert torch.equal(torch.cat([s.w_dir for s in shards], 1),
                       scale_aware_init_params(cfg, VOCAB + 1, seed)["w_dir"])


@pytest.mark.parametrize("direction", ["down", "up"])
def test_scale_aware_moves_both_ways_from_tau0_keeping_per_token_spread(seed, direction):
    """From tau0 = 1 the DRO loss pulls tau toward tau* below (rho large) or above (rho small)
    tau0; tau gets there without first collapsing to one constant (no floor to cross)."""
    z = random_logits(seed, rows=256)[1:]
    z = z - z.mean(-1, keepdim=True)
    rho = 2.5 if direction == "down" else 0.2
    cfg = TempNetConfig(arch="scale_aware", loss_mode="tempnet_dro", hidden_size=32, rho=rho,
                        tau_min=0.05, tau_max=20.0)
    head = build_tempnet_head(cfg, VOCAB, seed=seed, dtype=torch.float64)
    target = solve_tau(z, rho, cfg.tau_min, cfg.tau_max)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    y = torch.randint(0, VOCAB, (z.shape[0],), generator=torch.Generator().manual_seed(seed))
    spreads = []
    for _ in range(60):
        tau = head(z)
        loss, _, _ = dro_loss_per_token(z, y, tau, rho, None, impl="reference")
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        spreads.append(float(tau.detach().log().std()))
    tau = head(z).detach()
    moved = float(tau.median()) < 0.9 if direction == "down" else float(tau.median()) > 1.1
    assert moved, (direction, float(tau.median()), float(target.median()))
    assert min(spreads[5:]) > 0.05, spreads  # per-token variation all along


def test_scale_aware_matches_the_dense_reference_with_every_gradient(seed):
    head = scale_aware(seed)
    z = random_logits(seed)
    tau = head(z)
    ref = scale_aware_reference(z, dict(head.named_parameters()), head.config)
    torch.testing.assert_close(tau, ref, **FP64_TOL)
    weights = torch.randn(tau.shape, dtype=tau.dtype, generator=torch.Generator().manual_seed(seed))
    ours = torch.autograd.grad((tau * weights).sum(), list(head.parameters()))
    theirs = torch.autograd.grad((ref * weights).sum(), list(head.parameters()))
    for name, a, b in zip(SCALE_AWARE_PARAM_NAMES, ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    assert all(float(g.abs().max()) > 0 for g in ours)


def test_scale_aware_fp32_and_3d_inputs(seed):
    head = scale_aware(seed, dtype=torch.float32)
    z = random_logits(seed, dtype=torch.float32).view(4, 6, VOCAB)
    ref = scale_aware_reference(z.double(), {n: p.double() for n, p in head.named_parameters()},
                                head.config)
    tau = head(z.to(torch.bfloat16).float())  # any logits dtype, computed in fp32
    assert tau.shape == (4, 6) and tau.dtype == torch.float32
    torch.testing.assert_close(head(z).double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(tau).all()


def test_scale_aware_dropout_mask_matches_the_reference(seed):
    head = scale_aware(seed, dropout=0.3).train()
    z = random_logits(seed)
    torch.manual_seed(seed)
    tau = head(z)
    torch.manual_seed(seed)
    mask = torch.nn.functional.dropout(torch.ones(z.shape[0], HIDDEN, dtype=z.dtype), 0.3)
    ref = scale_aware_reference(z, dict(head.named_parameters()), head.config, mask)
    torch.testing.assert_close(tau, ref, **FP64_TOL)
    assert not torch.allclose(tau, head.eval()(z))


def test_scale_aware_sees_the_scale_and_ignores_a_shift(seed):
    head = scale_aware(seed).eval()
    z = random_logits(seed)[1:]
    torch.testing.assert_close(head(z + 7.5), head(z), rtol=1e-9, atol=1e-10)
    # where tau* changes with the scale (tau*(c z) = c tau*(z)), so does the head's tau
    star, star3 = solve_tau(z, 1.5, 0.05, 20.0), solve_tau(3 * z, 1.5, 0.05, 20.0)
    changed = (star3 - star).abs() > 1e-3
    assert changed.any()
    assert ((head(3 * z) - head(z)).abs()[changed] > 1e-6).all()
    assert len(SCALE_AWARE_FEATURES) == head.w_feat.shape[1]


def test_frozen_logits_scale_aware_learns_tau_star_and_paper_does_not(seed):
    """TempNet trained on fixed logits with the DRO loss (tempnet_dro, the frozen-LM setting):
    its optimum per token is the exact tau* (d loss / d tau = rho - KL(p_tau || u), whatever
    the label). Logits whose tau* varies with scale and shape; R^2 on held-out rows."""
    vocab, rho = 256, 1.0
    gen = torch.Generator().manual_seed(seed)

    def logits(n):
        scale = torch.exp(torch.empty(n).uniform_(math.log(0.5), math.log(4.0), generator=gen))
        g = torch.randn(n, vocab, generator=gen)
        spikes = torch.randint(0, 4, (n, 1), generator=gen) > torch.arange(4)
        g[:, :4] += 4 * torch.rand(n, 1, generator=gen) * spikes
        return g * scale[:, None]

    train, held_out = logits(2048), logits(512)
    target = solve_tau(held_out, rho, 0.05, 20.0)
    assert float(target.std()) > 0.3  # tau* does vary
    r2 = {}
    for arch, lr in (("paper", 1e-2), ("scale_aware", 1e-2)):
        cfg = TempNetConfig(arch=arch, loss_mode="tempnet_dro", hidden_size=32, rho=rho,
                            tau_min=0.05, tau_max=20.0, dropout=0.0)
        head = build_tempnet_head(cfg, vocab, seed=seed)
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        y = torch.randint(0, vocab, (train.shape[0],), generator=gen)
        for _ in range(200):
            idx = torch.randint(0, train.shape[0], (128,), generator=gen)
            loss, _, _ = dro_loss_per_token(train[idx], y[idx], head(train[idx]), rho, None,
                                            impl="reference")
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
        with torch.no_grad():
            r2[arch] = r_squared(head.eval()(held_out), target)
    assert r2["scale_aware"] >= 0.8, r2
    assert r2["paper"] < 0.5, r2


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"arch": "fancy"}, "--tempnet-arch"),
    ({"arch": "scale_aware", "tau0": 6.0}, "--tempnet-tau0"),
    ({"arch": "scale_aware", "tau0": 0.5}, "strictly inside"),
    ({"arch": "scale_aware", "tau0": float("nan")}, "--tempnet-tau0"),
    ({"tau0": 1.0}, "only --tempnet-arch scale_aware"),
    ({"arch": "scale_aware", "input_convention": "max_shifted"}, "--tempnet-input-convention"),
])
def test_bad_design_settings_name_their_flag(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        TempNetConfig(**kwargs).validate()


def test_checkpoint_of_one_design_refuses_the_other():
    record = {"model": {"family": "llama"},
              "tempnet": {"loss_mode": "tempnet_dro", "hidden_size": 32, "arch": "paper"}}
    other = {"model": {"family": "llama"},
             "tempnet": {"loss_mode": "tempnet_dro", "hidden_size": 32, "arch": "scale_aware"}}
    bad = shape_mismatches(record, other, finetune=False)
    assert len(bad) == 1 and "tempnet arch: checkpoint 'paper', this run 'scale_aware'" in bad[0]
    assert "--tempnet-arch paper" in bad[0]
    # a checkpoint from before --tempnet-arch is the paper's design
    legacy = {"model": {"family": "llama"},
              "tempnet": {"loss_mode": "tempnet_dro", "hidden_size": 32}}
    assert shape_mismatches(legacy, other, finetune=False)
    assert not shape_mismatches(legacy, record, finetune=False)
    # --finetune loads the LM only: the other design's TempNet starts from its init
    assert not shape_mismatches(record, other, finetune=True)


def test_start_at_tau_moves_an_untrained_head_only(seed):
    from megatron_tempnet.tempnet.head import start_at_tau

    head = scale_aware(seed, perturb=False, tau_min=0.1, tau_max=10.0)
    z = random_logits(seed)
    for target in (0.37, 1.0, 4.2):
        assert start_at_tau(head, target) == pytest.approx(target)
        torch.testing.assert_close(head(z).detach(), torch.full((z.shape[0],), target,
                                                                dtype=z.dtype))
    assert start_at_tau(head, 50.0) < 10.0  # clamped inside the bounds
    with torch.no_grad():
        head.w_out.add_(0.1)
    with pytest.raises(ValueError, match="no longer at its init"):
        start_at_tau(head, 1.0)
