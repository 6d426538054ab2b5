"""TempNetGPTModel (one process): dense-reference oracle, loss mask, fixed-tau identity, config,
the loss modes "tempnet_ce" and "dro_exact", and their checkpoint / Hugging Face round trips.

The model's per-token output [b, s, 4] = (loss, plain CE, tempered CE, tau) is checked
against the dense references of tempnet/reference.py applied to the model's own full logits
(its forward without labels), gradients included (docs/tempnet_math.md 1-2).
"""
import math

import pytest
import torch

from megatron_tempnet.config import ConfigError, load_model_preset
from megatron_tempnet.models.gpt import build_model
from megatron_tempnet.models.sharding import model_tensors
from megatron_tempnet.models.tempnet_gpt import (LOSS_CHANNELS, TempNetGPTModel,
                                                 build_tempnet_model)
from megatron_tempnet.tempnet import TempNetConfig, dro_loss_reference, tempnet_reference
from megatron_tempnet.tempnet.config import TEMPNET_LOSS_MODES
from megatron_tempnet.training.step import ReportSpec, global_metrics, masked_sum_loss

RTOL, ATOL = 1e-5, 1e-6  # fp32


def tiny(single_process, **tempnet):
    torch.manual_seed(0)
    cfg = load_model_preset("tiny-llama", vocab_size=200)  # padded to 256: padding columns too
    tcfg = TempNetConfig(**{"loss_mode": "tempnet_dro", "dropout": 0.0, "hidden_size": 32,
                            "rho": 3.0, **tempnet})
    return cfg, tcfg, build_tempnet_model(cfg, tcfg, single_process, seed=3)


def make_batch(vocab, b=3, s=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s), generator=gen)
    mask = (torch.rand(b, s, generator=gen) > 0.25).float()
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": mask,
            "position_ids": torch.arange(s).expand(b, s).contiguous()}


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    total, count, reports = masked_sum_loss(batch["loss_mask"], out,
                                            ReportSpec(getattr(model, "loss_channels", ())))
    (total / count).backward()
    return out.detach(), reports, {n: p.grad.clone() for n, p in model.named_parameters()}


# TempNet's tau with the DRO loss, and with the tempered CE(z / tau, y) ("TempNet without DRO")
@pytest.mark.parametrize("loss_mode,objective", [("tempnet_dro", "dro"),
                                                 ("tempnet_ce", "tempered_ce")])
def test_output_and_gradients_match_the_dense_references(single_process, loss_mode, objective):
    cfg, tcfg, model = tiny(single_process, loss_mode=loss_mode)
    assert isinstance(model, TempNetGPTModel) and len(LOSS_CHANNELS) == 4
    batch = make_batch(cfg.vocab_size)
    out, reports, grads = loss_and_grads(model, batch)

    model.zero_grad(set_to_none=True)
    logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, V] full at TP=1
    params = dict(model.tempnet.named_parameters())
    tau = tempnet_reference(logits, params, tcfg)  # [b, s]
    loss, stats = dro_loss_reference(logits, batch["labels"], tau, batch["loss_mask"], tcfg.rho,
                                     objective)
    loss.backward()
    torch.testing.assert_close(out[..., 3], tau.detach(), rtol=RTOL, atol=ATOL)
    metrics = global_metrics([reports], None)
    for ours, ref in [("dro loss", "dro_loss"), ("lm loss", "ce"), ("tempered ce", "tempered_ce"),
                      ("tau", "tau_mean"), ("tau min", "tau_min"), ("tau max", "tau_max")]:
        torch.testing.assert_close(metrics[ours], stats[ref], rtol=RTOL, atol=ATOL, msg=ours)
    assert tcfg.tau_min <= metrics["tau min"] <= metrics["tau max"] <= tcfg.tau_max
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=ATOL, msg=name)
    assert grads["tempnet.w1"].abs().sum() > 0 and grads["output_layer.weight"].abs().sum() > 0
    if objective == "tempered_ce":  # the loss channel is the tempered CE itself
        torch.testing.assert_close(out[..., 0], out[..., 2], rtol=0, atol=0)


def test_masked_tokens_contribute_nothing(single_process):
    cfg, _, model = tiny(single_process)
    batch = make_batch(cfg.vocab_size)
    batch["loss_mask"][:, -4:] = 0  # a padded tail: other tokens and labels must not matter
    padded = {k: v.clone() for k, v in batch.items()}
    padded["tokens"][:, -4:] = (padded["tokens"][:, -4:] + 7) % cfg.vocab_size
    padded["labels"][batch["loss_mask"] == 0] = -100  # out-of-vocabulary labels too
    _, reports_a, grads_a = loss_and_grads(model, batch)
    _, reports_b, grads_b = loss_and_grads(model, padded)
    for key in reports_a:
        torch.testing.assert_close(reports_a[key], reports_b[key], rtol=0, atol=0, msg=key)
    assert reports_a["lm loss"][1] == batch["loss_mask"].sum()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-9, msg=name)


def test_fixed_tau_one_is_cross_entropy_plus_constant(single_process):
    cfg, tcfg, model = tiny(single_process, loss_mode="dro_fixed_tau", fixed_tau=1.0)
    assert model.tempnet is None and not any("tempnet" in k for k in model.state_dict())
    plain = build_model(cfg, single_process)
    plain.load_state_dict(model_tensors(model), strict=False)
    batch = make_batch(cfg.vocab_size)
    out, _, grads = loss_and_grads(model, batch)
    ce, _, plain_grads = loss_and_grads(plain, batch)  # plain GPTModel: CE [b, s]
    log_v = math.log(cfg.padded_vocab_size())
    torch.testing.assert_close(out[..., 0], ce + (tcfg.rho - log_v), rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(out[..., 1], ce, rtol=RTOL, atol=ATOL)
    assert torch.all(out[..., 3] == 1.0)
    for name, g in plain_grads.items():  # a constant shift: the gradients of CE
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=ATOL, msg=name)


def test_ce_mode_is_the_plain_model_on_the_same_loss_path(single_process):
    cfg, _, model = tiny(single_process, loss_mode="ce")
    assert type(model).__name__ == "GPTModel"
    batch = make_batch(cfg.vocab_size)
    out, reports, _ = loss_and_grads(model, batch)
    assert out.shape == batch["tokens"].shape and set(reports) == {"lm loss"}


@pytest.mark.parametrize("field,value", [("loss_mode", "tempnet"), ("fixed_tau", 0.0),
                                         ("fixed_tau", float("inf")),
                                         ("training_mode", "frozen")])
def test_new_config_fields_name_their_flag(field, value):
    with pytest.raises(ConfigError, match=rf"TempNetConfig\.{field} \(--tempnet-"):
        TempNetConfig(**{field: value}).validate()


def test_frozen_lm_needs_tempnet_and_one_pipeline_stage(single_process):
    for mode in ("dro_fixed_tau", "dro_exact", "ce"):  # nothing but the LM to train
        with pytest.raises(ConfigError, match=f"frozen_lm.*tempnet_dro or tempnet_ce.*{mode}"):
            TempNetConfig(training_mode="frozen_lm", loss_mode=mode).validate()
    for mode in TEMPNET_LOSS_MODES:
        TempNetConfig(training_mode="frozen_lm", loss_mode=mode).validate()
    import dataclasses
    two_stages = dataclasses.replace(single_process, pp_size=2)
    with pytest.raises(ConfigError, match="pipeline-model-parallel-size 1"):
        build_tempnet_model(load_model_preset("tiny-llama", vocab_size=64),
                            TempNetConfig(loss_mode="tempnet_dro", training_mode="frozen_lm"),
                            two_stages)


def kl_to_uniform(logits, tau):
    """KL(softmax(z / tau) || uniform over the padded V) [...], float64."""
    logp = torch.log_softmax(logits.double() / tau.double().unsqueeze(-1), dim=-1)
    return math.log(logits.shape[-1]) + (logp.exp() * logp).sum(-1)


def test_dro_exact_is_the_dro_loss_at_the_exact_tau(single_process):
    # rho between KL(tau_max) and KL(tau_min) of this model's small initial logits: some rows
    # have their root inside [tau_min, tau_max], the others clamp to tau_min
    cfg, tcfg, model = tiny(single_process, loss_mode="dro_exact", rho=0.045)
    assert model.tempnet is None and not any("tempnet" in k for k in model.state_dict())
    batch = make_batch(cfg.vocab_size)
    out, reports, grads = loss_and_grads(model, batch)

    model.zero_grad(set_to_none=True)
    logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, V] full at TP=1
    tau = out[..., 3]  # tau*, detached: the oracle checks it, then uses it as a constant
    kl = kl_to_uniform(logits.detach(), tau)
    inside = (tau > tcfg.tau_min) & (tau < tcfg.tau_max)
    assert 0 < inside.sum() < tau.numel() and torch.all(tau[~inside] == tcfg.tau_min)
    assert torch.all(torch.where(inside, (kl - tcfg.rho).abs() <= 2e-5, True)), kl - tcfg.rho
    assert torch.all(torch.where(~inside, kl <= tcfg.rho, True))  # no root: dl/dtau > 0
    loss, stats = dro_loss_reference(logits, batch["labels"], tau, batch["loss_mask"], tcfg.rho)
    loss.backward()  # the envelope theorem: tau* constant gives the exact gradient
    metrics = global_metrics([reports], None)
    for ours, ref in [("dro loss", "dro_loss"), ("lm loss", "ce"), ("tempered ce", "tempered_ce"),
                      ("tau", "tau_mean"), ("tau min", "tau_min"), ("tau max", "tau_max")]:
        torch.testing.assert_close(metrics[ours], stats[ref], rtol=RTOL, atol=ATOL, msg=ours)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=ATOL, msg=name)
    # the DRO dual value: no tau on a grid in the bounds gives a lower loss for any token
    grid = torch.linspace(tcfg.tau_min, tcfg.tau_max, 200, dtype=torch.float64)
    z = logits.detach().double()
    z_y = z.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    on_grid = (grid * torch.logsumexp(z.unsqueeze(-2) / grid.view(-1, 1), -1) - z_y.unsqueeze(-1)
               + (tcfg.rho - math.log(z.shape[-1])) * grid)  # [b, s, G]
    assert torch.all(out[..., 0].double() <= on_grid.amin(-1) + 1e-6)


@pytest.mark.parametrize("loss_mode", ["dro_exact", "tempnet_ce"])
def test_new_modes_checkpoint_and_export_round_trip(single_process, tmp_path, monkeypatch,
                                                    loss_mode):
    """Save through dist_checkpointing (this process), load with the converter's reader, export
    to Hugging Face: the weights and config come back and the export applies the same tau."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from megatron_tempnet.config import TrainConfig
    from megatron_tempnet.hf import convert
    from megatron_tempnet.training.checkpoint_layout import (CHECKPOINT_VERSION, iteration_dir,
                                                             write_latest)
    from megatron_tempnet.training.checkpointing import model_sharded_state_dict, save_sharded
    from megatron_tempnet.training.run_record import run_record, shape_mismatches

    cfg, tcfg, model = tiny(single_process, loss_mode=loss_mode, rho=0.045, tau_min=0.3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    record = run_record(cfg, tcfg, TrainConfig(), single_process)
    path = iteration_dir(tmp_path / "ckpt", 3)
    path.mkdir(parents=True)
    state = model_sharded_state_dict([model])
    state.update(iteration=3, consumed_samples=0, checkpoint_version=CHECKPOINT_VERSION,
                 config=record)
    save_sharded(state, path)
    write_latest(tmp_path / "ckpt", 3)

    monkeypatch.setattr(convert, "_single_process", lambda: single_process)  # no re-initialize
    full, _, loaded_cfg = convert.load_checkpoint_full(str(tmp_path / "ckpt"))
    assert loaded_cfg == tcfg
    ours = model_tensors(model)
    assert set(full) == set(ours) and any(k.startswith("tempnet.") for k in full) == (
        loss_mode == "tempnet_ce")
    for key, value in ours.items():
        assert torch.equal(full[key], value), key
    assert shape_mismatches(record, record, finetune=False) == []
    other = run_record(cfg, dataclasses.replace(tcfg, loss_mode="tempnet_dro", hidden_size=16),
                       TrainConfig(), single_process)
    hidden_mismatch = [m for m in shape_mismatches(record, other, finetune=True)
                       if "hidden_size" in m]
    assert bool(hidden_mismatch) == (loss_mode == "tempnet_ce"), hidden_mismatch

    convert.checkpoint_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "TempNetLlamaForCausalLM"
    assert hf.config.tempnet["loss_mode"] == loss_mode and hf.config.tempnet["tau_min"] == 0.3
    assert (hf.tempnet is None) == (loss_mode == "dro_exact")
    batch = make_batch(cfg.vocab_size, b=2, s=9)
    model.eval()
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, 256]
        tau = model.token_tau(logits)
        out = hf(batch["tokens"], return_tau=True)
    inside = (tau > tcfg.tau_min) & (tau < tcfg.tau_max)
    assert inside.any() and tau.std() > 0  # a per-token tau, not a bound
    torch.testing.assert_close(out.tau, tau, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out.logits, logits[..., :cfg.vocab_size] / tau.unsqueeze(-1),
                               rtol=1e-5, atol=2e-5)


@pytest.mark.triton
@pytest.mark.parametrize("impl", ["fused", "fused_linear"])
@pytest.mark.parametrize("loss_mode", ["tempnet_dro", "tempnet_ce", "dro_exact"])
def test_dro_loss_impls_give_the_reference_model(single_process, loss_mode, impl, monkeypatch):
    """--dro-loss-impl fused / fused_linear (Triton; the interpreter on a CPU) give the same
    per-token channels and every gradient (LM and TempNet) as the reference implementation,
    through the training step's own forward_step and masked_sum_loss (loss mask passed)."""
    from megatron_tempnet.tempnet import triton_kernels
    from megatron_tempnet.training.step import forward_step

    kernel_calls, real_row_stats = [], triton_kernels.row_stats
    monkeypatch.setattr(triton_kernels, "row_stats",
                        lambda *a, **k: kernel_calls.append(1) or real_row_stats(*a, **k))

    def run(dro_loss_impl):
        _, _, model = tiny(single_process, loss_mode=loss_mode, dro_loss_impl=dro_loss_impl,
                           rho=0.045 if loss_mode == "dro_exact" else 3.0)
        projections = []  # megatron's output layer: not called at all by fused_linear
        model.output_layer.register_forward_hook(lambda *_: projections.append(1))
        batch = make_batch(200)
        out, loss_func = forward_step(iter([batch]), model, spec=ReportSpec(LOSS_CHANNELS))
        total, count, _ = loss_func(out)
        (total / count).backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters()}, len(projections)

    ref_out, ref_grads, _ = run("reference")
    assert not kernel_calls
    out, grads, projections = run(impl)
    assert kernel_calls and projections == (0 if impl == "fused_linear" else 1)
    tol = dict(rtol=2e-4, atol=2e-5) if loss_mode == "dro_exact" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref_out, **tol, msg=f"{loss_mode} {impl}: channels")
    assert ref_grads.keys() == grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, **tol, msg=f"{loss_mode} {impl}: {name}")
