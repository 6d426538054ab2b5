"""TP=2, PP=2 and DP=2 (torchrun, 2 processes) give the single-process loss and gradients.

Both families; the LLaMA preset has grouped-query attention (4 heads, 2 query groups) and the
GPT preset ties its embeddings (so PP=2 exercises the embedding/output-layer gradient sync).
"""
import dataclasses

import pytest
import torch

from megatron_tempnet.config import load_model_preset
from megatron_tempnet.models.gpt import build_model
from megatron_tempnet.models.sharding import assemble_full, model_tensors
from torchrun import run_torchrun

pytestmark = pytest.mark.parallel
LOSS_RTOL, GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-6, 1e-4  # fp32; reductions reorder sums


def reference_case(single_process, preset, seed):
    torch.manual_seed(seed)
    cfg = load_model_preset(preset, vocab_size=256)  # 256: no extra padding at TP=2
    model = build_model(cfg, single_process)
    with torch.no_grad():  # random norms and biases so that every mapping error shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    b, s = 4, 24
    tokens = torch.randint(0, cfg.vocab_size, (b, s))
    loss_mask = (torch.rand(b, s) > 0.2).float()
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
             "position_ids": torch.arange(s).expand(b, s).contiguous(), "loss_mask": loss_mask}
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss = (per_token * loss_mask).sum() / loss_mask.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    case = {"cfg": dataclasses.asdict(cfg), "full": model_tensors(model), "batch": batch}
    return case, loss.detach(), grads, cfg


def test_tp_pp_dp_match_single_process(single_process, tmp_path, seed):
    cases, refs = {}, {}
    for preset in ("tiny-llama", "tiny-gpt"):
        case, loss, grads, cfg = reference_case(single_process, preset, seed)
        cases[cfg.family], refs[cfg.family] = case, (loss, grads, cfg)
    torch.save(cases, tmp_path / "cases.pt")
    ranks = run_torchrun("model_parity_worker.py", tmp_path, str(tmp_path / "cases.pt"))

    for (family, tp, pp), _ in ranks[0].items():
        ref_loss, ref_grads, cfg = refs[family]
        per_rank = [r[(family, tp, pp)] for r in ranks]
        where = f"{family} TP={tp} PP={pp} DP={2 // (tp * pp)} (seed {seed})"
        # each DP rank's last stage holds the loss sum of its half; together the global mean
        total = sum(r["loss"] for r in per_rank if r["loss"] is not None)
        torch.testing.assert_close(total[0] / total[1], ref_loss, rtol=LOSS_RTOL, atol=0,
                                   msg=where)
        locals_ = {(r["pp_rank"], r["tp_rank"]): r["grads"] for r in per_rank if r["dp_rank"] == 0}
        grads = assemble_full(locals_, cfg, tp, pp)
        assert set(grads) == set(ref_grads), (where, sorted(set(grads) ^ set(ref_grads)))
        for key, ref in ref_grads.items():
            torch.testing.assert_close(grads[key], ref, atol=GRAD_ATOL, rtol=GRAD_RTOL,
                                       msg=f"{where}: {key}")
        if tp * pp == 1:  # data-parallel replicas hold identical reduced gradients
            for key in per_rank[0]["grads"]:
                assert torch.equal(per_rank[0]["grads"][key], per_rank[1]["grads"][key]), key
