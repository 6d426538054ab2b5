"""TempNet GPT/LLaMA (TempNet head + DRO loss) at TP=2, PP=2 and DP=2 match one process; at
TP=2 also the loss modes "dro_fixed_tau", "dro_exact" (the vocab-parallel tau* solver) and
"tempnet_ce" (TempNet with the tempered CE); the scale_aware TempNet design at TP=2 (reference
and fused_linear loss paths, both objectives) and PP=2.

One torchrun launch (2 processes) runs every layout (tests/workers/tempnet_model_worker.py);
the reference is the same model at TP=1/PP=1 in this process. Checked: the DRO loss, plain CE,
tempered CE, tau mean/min/max, and the gradients of every LM and TempNet parameter (gathered
with ``assemble_full``, so TempNet's column-sharded W1 goes through ``tp_split_dim``).

Parity layouts use TempNet dropout 0 (the reference's default generator is not the workers').
The "dropout" layout runs dropout 0.5 in training mode at TP=2 and checks only that both TP ranks
agree (same tau stats, identical replicated gradients): the head runs outside megatron's RNG
tracker fork, so both TP ranks draw the same mask.
"""
import dataclasses
import importlib.util
import math

import pytest
import torch

from megatron_tempnet.config import load_model_preset
from megatron_tempnet.models.sharding import assemble_full, model_tensors, tp_split_dim
from megatron_tempnet.models.tempnet_gpt import build_tempnet_model, loss_channels
from megatron_tempnet.tempnet import TempNetConfig
from megatron_tempnet.training.step import ReportSpec, global_metrics, masked_sum_loss
from torchrun import run_torchrun

pytestmark = pytest.mark.parallel
RTOL, GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-6, 1e-4  # fp32; reductions reorder sums

# name -> (preset, loss_mode, dropout, (tp, pp)); world size 2, so DP = 2 / (tp * pp)
LAYOUTS = {
    "llama tempnet TP=2": ("tiny-llama", "tempnet_dro", 0.0, (2, 1)),
    "llama tempnet PP=2": ("tiny-llama", "tempnet_dro", 0.0, (1, 2)),
    "llama tempnet DP=2": ("tiny-llama", "tempnet_dro", 0.0, (1, 1)),
    "gpt tempnet PP=2": ("tiny-gpt", "tempnet_dro", 0.0, (1, 2)),  # tied embeddings
    "llama fixed tau TP=2": ("tiny-llama", "dro_fixed_tau", 0.0, (2, 1)),
    "llama dropout TP=2": ("tiny-llama", "tempnet_dro", 0.5, (2, 1)),
    "llama exact tau TP=2": ("tiny-llama", "dro_exact", 0.0, (2, 1)),  # the tau* solver
    "llama tempnet ce TP=2": ("tiny-llama", "tempnet_ce", 0.0, (2, 1)),  # tempered CE objective
    "llama fused_linear TP=2": ("tiny-llama", "tempnet_dro", 0.0, (2, 1)),
    "gpt fused_linear PP=2": ("tiny-gpt", "tempnet_dro", 0.0, (1, 2)),  # tied output weight
    "llama scale_aware TP=2": ("tiny-llama", "tempnet_dro", 0.0, (2, 1)),
    "llama scale_aware ce TP=2": ("tiny-llama", "tempnet_ce", 0.0, (2, 1)),
    "llama scale_aware fused_linear TP=2": ("tiny-llama", "tempnet_dro", 0.0, (2, 1)),
    "gpt scale_aware PP=2": ("tiny-gpt", "tempnet_dro", 0.0, (1, 2)),
}
# layouts with the scale_aware TempNet design (--tempnet-arch; the others: "paper")
ARCHS = {name: "scale_aware" for name in LAYOUTS if "scale_aware" in name}
# layouts run with another --dro-loss-impl than the single-process reference's (Triton kernels;
# their interpreter on a CPU): the output projection fused with TempNet and the loss
IMPLS = {name: "fused_linear" for name in LAYOUTS if "fused_linear" in name}
if importlib.util.find_spec("triton") is None:  # without Triton those layouts run the reference
    IMPLS = {}


def reference_case(single_process, preset, loss_mode, dropout, seed, arch="paper"):
    torch.manual_seed(seed)
    cfg = load_model_preset(preset, vocab_size=256)  # 256: no extra padding at TP=2
    tcfg = TempNetConfig(loss_mode=loss_mode, dropout=dropout, hidden_size=32, rho=4.0,
                         fixed_tau=0.7, arch=arch)
    model = build_tempnet_model(cfg, tcfg, single_process, seed=seed)
    with torch.no_grad():  # random norms, biases and pooling so that every mapping error shows
        for name, p in model.named_parameters():
            if p.dim() <= 1 or name.startswith("tempnet."):
                p.add_(torch.randn_like(p) * 0.2)
    b, s = 4, 16
    tokens = torch.randint(0, cfg.vocab_size, (b, s))
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
             "position_ids": torch.arange(s).expand(b, s).contiguous(),
             "loss_mask": (torch.rand(b, s) > 0.2).float()}
    if loss_mode == "dro_exact":  # logits of scale ~1 (tau* well conditioned: Var_p(z/tau) ~ 1)
        with torch.no_grad():  # and rho = the median KL at tau 0.7: roots inside the bounds
            model.output_layer.weight.mul_(10)
            logits = model(batch["tokens"], batch["position_ids"], None).double()
            logp = torch.log_softmax(logits / 0.7, dim=-1)
            tcfg.rho = float((logp.exp() * logp).sum(-1).median()) + math.log(logits.shape[-1])
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    total, count, reports = masked_sum_loss(batch["loss_mask"], out,
                                            ReportSpec(loss_channels(tcfg)))
    (total / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    case = {"cfg": dataclasses.asdict(cfg), "tempnet": dataclasses.asdict(tcfg),
            "full": model_tensors(model), "batch": batch, "dropout_seed": seed + 1}
    return case, global_metrics([reports], None), grads, cfg


def test_tempnet_model_tp_pp_dp_match_single_process(single_process, tmp_path, seed):
    cases, refs = {}, {}
    for name, (preset, mode, dropout, layout) in LAYOUTS.items():
        case, metrics, grads, cfg = reference_case(single_process, preset, mode, dropout, seed,
                                                   ARCHS.get(name, "paper"))
        case["tempnet"]["dro_loss_impl"] = IMPLS.get(name, "reference")
        cases[name], refs[name] = dict(case, layout=layout), (metrics, grads, cfg)
    torch.save(cases, tmp_path / "cases.pt")
    ranks = run_torchrun("tempnet_model_worker.py", tmp_path, str(tmp_path / "cases.pt"))

    for name, (preset, mode, dropout, (tp, pp)) in LAYOUTS.items():
        ref_metrics, ref_grads, cfg = refs[name]
        per_rank = [r[name] for r in ranks]
        where = f"{name} (seed {seed})"
        last = [r for r in per_rank if r["reports"] is not None]
        if dropout:  # TP ranks agree: same stats, identical replicated TempNet gradients
            assert tp == 2 and len(last) == 2, where
            for key in last[0]["reports"]:
                assert torch.equal(last[0]["reports"][key], last[1]["reports"][key]), (where, key)
            for key, g in per_rank[0]["grads"].items():
                if key.startswith("tempnet.") and tp_split_dim(key) is None:
                    assert torch.equal(g, per_rank[1]["grads"][key]), (where, key)
            continue
        # one report per data-parallel rank's last stage (TP ranks hold the same values)
        metrics = global_metrics([r["reports"] for r in last if r["tp_rank"] == 0], None)
        assert set(metrics) == set(ref_metrics), where
        for key, ref in ref_metrics.items():
            torch.testing.assert_close(metrics[key], ref, rtol=RTOL, atol=1e-6,
                                       msg=f"{where}: {key}")
        locals_ = {(r["pp_rank"], r["tp_rank"]): r["grads"] for r in per_rank if r["dp_rank"] == 0}
        grads = assemble_full(locals_, cfg, tp, pp)
        assert set(grads) == set(ref_grads), (where, sorted(set(grads) ^ set(ref_grads)))
        uses_tempnet = TempNetConfig(loss_mode=mode).uses_tempnet
        assert any(k.startswith("tempnet.") for k in grads) == uses_tempnet, where
        for key, ref in ref_grads.items():
            torch.testing.assert_close(grads[key], ref, atol=GRAD_ATOL, rtol=GRAD_RTOL,
                                       msg=f"{where}: {key}")
        if mode == "dro_exact":  # some tokens at their root, some at a bound
            assert ref_metrics["tau min"] < ref_metrics["tau max"], where
        if tp == 2 and uses_tempnet:  # W1 (w_dir) is saved as a column shard of [M, V]
            m, v = grads["tempnet." + ("w_dir" if name in ARCHS else "w1")].shape
            assert {r["w1_sharding"] for r in per_rank} == {
                ((m, v // 2), (m, v), (0, 0)), ((m, v // 2), (m, v), (0, v // 2))}, where
