"""Evaluation metrics (training/evaluate.py) against a dense single-process reference.

The reference takes the model's full logits [b, s, V] (TP=1 forward without labels) and computes
with plain torch / numpy: perplexity exp(mean CE) at tau = 1, at TempNet's per-token tau, at a
fixed tau and at every grid temperature; ECE with 15 equal-width bins (lo, hi] from
softmax max-prob and argmax correctness; top-1 accuracy; the temperature tools (entropy-adaptive
T, confidence threshold, ensemble: tests/temperature_reference.py). Loss mask applied throughout.
"""
import math

import numpy as np
import pytest
import torch

import temperature_reference as tools_ref
from batches import random_batches
from megatron_tempnet.config import ConfigError, load_model_preset
from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
from megatron_tempnet.tempnet import TempNetConfig
from megatron_tempnet.training.config import EvalConfig
from megatron_tempnet.training.evaluate import (evaluate, format_eval_table,
                                                vocab_parallel_token_stats)

RTOL = 1e-5  # fp32 logits, fp64 sums


def numpy_ece(confidence, correct, weight, bins=15):
    """ECE, Guo et al. 2017: bins (lo, hi] of [0, 1]; sum_b n_b/N |acc_b - conf_b|."""
    confidence, correct, weight = map(np.asarray, (confidence, correct, weight))
    edges = np.linspace(0.0, 1.0, bins + 1)
    total, ece = weight.sum(), 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi) & (weight > 0)
        if lo == 0.0:
            inside |= (confidence == 0.0) & (weight > 0)
        n = weight[inside].sum()
        if n > 0:
            acc = (weight[inside] * correct[inside]).sum() / n
            conf = (weight[inside] * confidence[inside]).sum() / n
            ece += n / total * abs(acc - conf)
    return ece


def dense_metrics(logits, labels, mask, tau):
    """(ppl, ece) at temperature tau (scalar or [b, s]) from full logits [b, s, V]."""
    z = logits.double()
    tau = torch.as_tensor(tau, dtype=torch.float64).expand(labels.shape).unsqueeze(-1)
    logp = torch.log_softmax(z / tau, dim=-1)
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    keep = mask > 0
    ppl = math.exp(float(nll[keep].mean()))
    probs = logp.exp()
    conf = probs.amax(-1)
    correct = (z.argmax(-1) == labels).double()
    return ppl, numpy_ece(conf[keep].numpy(), correct[keep].numpy(), mask[keep].numpy())


def make_batches(vocab, n, b=2, s=16, seed=5):
    return random_batches(vocab, n, b, s, seed)


def tiny_model(single_process, loss_mode, **tempnet):
    torch.manual_seed(0)
    cfg = load_model_preset("tiny-llama", vocab_size=200)  # padded to 256
    tcfg = TempNetConfig(loss_mode=loss_mode, hidden_size=32, **tempnet)
    model = build_tempnet_model(cfg, tcfg, single_process, seed=3)
    with torch.no_grad():  # sharpen the logits so that calibration varies with T
        model.output_layer.weight.mul_(20.0)
        if getattr(model, "tempnet", None) is not None:
            if tcfg.arch == "paper":
                model.tempnet.pool_c.add_(0.7)
            else:
                model.tempnet.b_out.add_(0.7)
    return cfg, model


def full_logits(model, batches):
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b["tokens"], b["position_ids"], None) for b in batches])
        head = getattr(model, "tempnet", None)
        tau = head(logits, None) if head is not None else None
    model.train()
    cat = {k: torch.cat([b[k] for b in batches]) for k in ("labels", "loss_mask")}
    return logits, tau, cat["labels"], cat["loss_mask"]


def run_eval(model, batches, ctx, num_batches, num_micro, config=None):
    return evaluate([model], iter(batches), num_batches, ctx, seq_length=16,
                    micro_batch_size=2, num_microbatches=num_micro, config=config)


def test_tempnet_model_metrics_match_dense_reference(single_process):
    cfg, model = tiny_model(single_process, "tempnet_dro", dropout=0.5)
    batches = make_batches(cfg.vocab_size, 4)
    was_training = model.training
    result = run_eval(model, batches, single_process, num_batches=2, num_micro=2)
    assert model.training == was_training and model.tempnet.training == was_training
    logits, tau, labels, mask = full_logits(model, batches)

    ppl1, ece1 = dense_metrics(logits, labels, mask, 1.0)
    ce = -torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert math.isclose(ppl1, math.exp(float(ce[mask > 0].mean())), rel_tol=1e-12)
    assert result["eval tokens"] == float(mask.sum())
    assert math.isclose(result["ppl tau=1"], ppl1, rel_tol=RTOL)
    assert math.isclose(result["ece tau=1"], ece1, rel_tol=RTOL, abs_tol=1e-6)
    ppl_t, ece_t = dense_metrics(logits, labels, mask, tau)  # TempNet eval mode: no dropout
    assert math.isclose(result["ppl tempnet"], ppl_t, rel_tol=RTOL)
    assert math.isclose(result["ece tempnet"], ece_t, rel_tol=RTOL, abs_tol=1e-6)
    assert math.isclose(result["tau mean"], float(tau[mask > 0].double().mean()), rel_tol=RTOL)
    hist = result["tau histogram"]
    assert len(hist["counts"]) == 32 and sum(hist["counts"]) == float(mask.sum())
    acc = float((logits.argmax(-1) == labels)[mask > 0].double().mean())
    assert math.isclose(result["accuracy"], acc, rel_tol=1e-12)

    # best global T: dense value at T, no worse than tau = 1 or any grid point (dense), and the
    # refined grid brackets it
    grid = result["temperature grid"]
    assert len(grid) >= 25 + 16 - 2  # the fine grid shares its end points with the coarse one
    best_ppl, best_ece = dense_metrics(logits, labels, mask, result["best T"])
    assert math.isclose(result["ppl best T"], best_ppl, rel_tol=RTOL)
    assert math.isclose(result["ece best T"], best_ece, rel_tol=RTOL, abs_tol=1e-6)
    for t, p, e in grid[::5]:
        dense_p, dense_e = dense_metrics(logits, labels, mask, t)
        assert math.isclose(p, dense_p, rel_tol=RTOL) and math.isclose(e, dense_e, abs_tol=1e-6)
    assert result["ppl best T"] <= min(p for _, p, _ in grid) + 1e-12
    assert result["ppl best T"] <= ppl1
    coarse = EvalConfig().coarse_grid()
    for t in coarse:  # no coarse temperature beats it, checked densely
        assert dense_metrics(logits, labels, mask, t)[0] >= best_ppl * (1 - 1e-9)
    table = format_eval_table(result)
    assert "TempNet tau" in table and "best global T" in table and "ECE" in table


def test_fixed_tau_and_plain_ce_models(single_process):
    cfg, model = tiny_model(single_process, "dro_fixed_tau", fixed_tau=0.7)
    batches = make_batches(cfg.vocab_size, 2, seed=9)
    result = run_eval(model, batches, single_process, num_batches=1, num_micro=2,
                      config=EvalConfig(refine_points=0))
    logits, _, labels, mask = full_logits(model, batches)
    ppl, ece = dense_metrics(logits, labels, mask, 0.7)
    assert result["fixed tau"] == 0.7 and "ppl tempnet" not in result
    assert math.isclose(result["ppl fixed tau"], ppl, rel_tol=RTOL)
    assert math.isclose(result["ece fixed tau"], ece, rel_tol=RTOL, abs_tol=1e-6)
    # the coarse grid only (no second pass): 25 log-spaced (T = 1 among them) + the fixed tau
    assert [t for t, _, _ in result["temperature grid"]] == EvalConfig().coarse_grid((0.7,))
    assert "fixed tau = 0.7" in format_eval_table(result)

    cfg, model = tiny_model(single_process, "ce")
    result = run_eval(model, batches, single_process, num_batches=2, num_micro=1)
    logits, _, labels, mask = full_logits(model, batches)
    ppl, ece = dense_metrics(logits, labels, mask, 1.0)
    assert math.isclose(result["ppl tau=1"], ppl, rel_tol=RTOL)
    assert set(result) >= {"ppl best T", "ece best T"} and "ppl tempnet" not in result


def test_token_stats_ties_and_masked_targets():
    """argmax ties go to the lowest index; out-of-range targets (-100) give finite values."""
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 1.0, 5.0]])
    target = torch.tensor([2, 0, 1])
    temps = torch.tensor([1.0, 0.5])
    nll, conf, correct = vocab_parallel_token_stats(z, target, temps)
    assert correct.tolist() == [False, True, True]
    ref = -torch.log_softmax(z.unsqueeze(1) / temps.view(1, -1, 1), -1)
    torch.testing.assert_close(nll, ref.gather(-1, target.view(-1, 1, 1).expand(-1, 2, 1))
                               .squeeze(-1))
    torch.testing.assert_close(conf, (-ref).exp().amax(-1))
    nll, _, correct = vocab_parallel_token_stats(z, torch.tensor([-100, 1, 7]), temps)
    assert torch.isfinite(nll).all() and correct.tolist() == [False, False, False]


def test_eval_config_errors():
    with pytest.raises(ConfigError, match="temperature_min"):
        EvalConfig(temperature_min=3.0, temperature_max=2.0).validate()
    with pytest.raises(ConfigError, match="eval_iters"):
        EvalConfig(eval_iters=-1).validate()
    grid = EvalConfig().coarse_grid((0.7,))
    assert 1.0 in grid and 0.7 in grid and len(grid) == 26  # [0.05, 20] x 25 holds T = 1
    assert math.isclose(grid[0], 0.05) and math.isclose(grid[-1], 20.0)


@pytest.mark.parametrize("arch", ["paper", "scale_aware"])
def test_tau_spread_and_agreement_with_the_exact_tau(single_process, arch):
    """"tau std" and, for tempnet_dro, R^2 / Pearson of the own tau against the exact tau* of
    the same logits, from a dense computation over the masked tokens."""
    from megatron_tempnet.tempnet import solve_tau

    cfg, model = tiny_model(single_process, "tempnet_dro", arch=arch, rho=1.0, tau_min=0.05,
                            tau_max=20.0)
    if arch == "scale_aware":  # off its tau0 init: a tau that varies per token
        with torch.no_grad():
            model.tempnet.w_out_feat.copy_(torch.tensor([0.6, 0.3, -0.5, 0.2, 0.4]))
    batches = make_batches(cfg.vocab_size, 4)
    result = evaluate([model], iter(batches), 2, single_process, seq_length=16,
                      micro_batch_size=2, num_microbatches=2)
    logits, tau, _, mask = full_logits(model, batches)
    star = solve_tau(logits.double(), 1.0, 0.05, 20.0)
    keep = mask > 0
    t, s = tau.double()[keep], star[keep]
    assert float(s.std()) > 0.01  # tau* varies over these tokens
    r2 = 1 - float(((t - s) ** 2).sum() / ((s - s.mean()) ** 2).sum())
    assert math.isclose(result["tau std"], float(t.std(unbiased=False)), rel_tol=1e-4,
                        abs_tol=1e-7)
    assert math.isclose(result["tau* mean"], float(s.mean()), rel_tol=1e-5)
    assert math.isclose(result["r2 tau*"], r2, rel_tol=1e-4, abs_tol=1e-6)
    if arch == "scale_aware":
        pearson = float(torch.corrcoef(torch.stack([t, s]))[0, 1])
        assert math.isclose(result["pearson tau*"], pearson, rel_tol=1e-4, abs_tol=1e-6)
    assert "R^2" in format_eval_table(result)


def dense_tool_metrics(logits, labels, mask, cfg):
    """The temperature tools' metrics at ``cfg``'s settings from the full logits [b, s, V]."""
    keep = mask > 0
    entropy_t = tools_ref.entropy_temperature(logits, cfg.entropy_temperature_base,
                                              cfg.entropy_temperature_alpha)
    threshold_t, confident = tools_ref.threshold_temperature(
        logits, cfg.confidence_threshold, cfg.confident_temperature, cfg.uncertain_temperature)
    p_ens = tools_ref.ensemble_probs(logits, cfg.ensemble_temperatures)  # [b, s, V]
    nll_ens = -torch.log(p_ens.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
    correct = (logits.argmax(-1) == labels).double()
    out = {"entropy T mean": float(entropy_t[keep].mean()),
           "threshold confident fraction": float(confident[keep].double().mean()),
           "ppl ensemble": math.exp(float(nll_ens[keep].mean())),
           "ece ensemble": numpy_ece(p_ens.amax(-1)[keep].numpy(), correct[keep].numpy(),
                                     mask[keep].numpy())}
    for name, temperature in (("entropy T", entropy_t), ("threshold T", threshold_t)):
        out[f"ppl {name}"], out[f"ece {name}"] = dense_metrics(logits, labels, mask, temperature)
    return out


@pytest.mark.parametrize("loss_mode,tempnet", [("tempnet_dro", {}), ("ce", {}),
                                               ("dro_fixed_tau", {"fixed_tau": 0.7}),
                                               ("dro_exact", {"rho": 1.0})])
def test_temperature_tools_match_dense_reference(single_process, loss_mode, tempnet, seed):
    """Every model's evaluation reports the entropy-adaptive T, the confidence threshold and
    the ensemble at EvalConfig's settings, equal to the dense reference on fresh random
    batches; the threshold lies between two tokens' confidences (both levels occur)."""
    cfg, model = tiny_model(single_process, loss_mode, **tempnet)
    batches = make_batches(cfg.vocab_size, 2, seed=seed)
    logits, _, labels, mask = full_logits(model, batches)
    conf = torch.softmax(logits.double(), -1).amax(-1)[mask > 0].sort().values
    k = int(torch.argmax(conf.diff()[len(conf) // 4: 3 * len(conf) // 4])) + len(conf) // 4
    assert conf[k + 1] - conf[k] > 1e-5, f"seed {seed}"  # fp32 confidences fall on one side
    tools = EvalConfig(refine_points=0, entropy_temperature_base=0.7,
                       entropy_temperature_alpha=1.5, ensemble_temperatures=[0.4, 1.0, 2.5],
                       confidence_threshold=float(conf[k] + conf[k + 1]) / 2,
                       confident_temperature=0.6, uncertain_temperature=1.8)
    result = run_eval(model, batches, single_process, num_batches=1, num_micro=2, config=tools)
    expected = dense_tool_metrics(logits, labels, mask, tools)
    for key, value in expected.items():
        assert math.isclose(result[key], value, rel_tol=RTOL, abs_tol=1e-6), \
            (key, result[key], value, f"seed {seed}")
    assert 0 < result["threshold confident fraction"] < 1
    assert result["temperature tools"]["ensemble_temperatures"] == [0.4, 1.0, 2.5]
    assert result["temperature tools"]["confident_temperature"] == 0.6
    # the rest is unchanged by the extra columns: tau = 1 and the grid
    assert math.isclose(result["ppl tau=1"], dense_metrics(logits, labels, mask, 1.0)[0],
                        rel_tol=RTOL)
    assert [t for t, _, _ in result["temperature grid"]] == EvalConfig().coarse_grid(
        [tempnet["fixed_tau"]] if "fixed_tau" in tempnet else ())
    table = format_eval_table(result)
    for row in ("entropy-adaptive T (base 0.7, a 1.5; mean", "ensemble T in {0.4, 1, 2.5}",
                f"confidence threshold {tools.confidence_threshold:g} (T 0.6 / 1.8;"):
        assert row in table, table
