"""TempNetGPTModel (one process): dense-reference oracle, loss mask, fixed-tau identity, config.

The model's per-token output [b, s, 4] = (DRO loss, plain CE, tempered CE, tau) is checked
against the dense references of tempnet/reference.py applied to the model's own full logits
(its forward without labels), gradients included (tempnet.md 1-2).
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
from megatron_tempnet.training.step import global_metrics, masked_sum_loss

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
    total, count, reports = masked_sum_loss(batch["loss_mask"], out)
    (total / count).backward()
    return out.detach(), reports, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_output_and_gradients_match_the_dense_references(single_process):
    cfg, tcfg, model = tiny(single_process)
    assert isinstance(model, TempNetGPTModel) and len(LOSS_CHANNELS) == 4
    batch = make_batch(cfg.vocab_size)
    out, reports, grads = loss_and_grads(model, batch)

    model.zero_grad(set_to_none=True)
    logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, V] full at TP=1
    params = dict(model.tempnet.named_parameters())
    tau = tempnet_reference(logits, params, tcfg)  # [b, s]
    loss, stats = dro_loss_reference(logits, batch["labels"], tau, batch["loss_mask"], tcfg.rho)
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
    with pytest.raises(ConfigError, match="frozen_lm.*tempnet_dro"):
        TempNetConfig(training_mode="frozen_lm", loss_mode="dro_fixed_tau").validate()
    import dataclasses
    two_stages = dataclasses.replace(single_process, pp_size=2)
    with pytest.raises(ConfigError, match="pipeline-model-parallel-size 1"):
        build_tempnet_model(load_model_preset("tiny-llama", vocab_size=64),
                            TempNetConfig(loss_mode="tempnet_dro", training_mode="frozen_lm"),
                            two_stages)
