"""TempNet head + DRO loss at TP=2 (torchrun, 2 processes, gloo) equal the single-process TP=1
results on the same full inputs, and the loss costs no more collectives
than megatron-core's vocab-parallel cross-entropy; so do the exact tau* of loss_mode "dro_exact"
(exact_tau.solve_tau: one all-reduce(max), then one packed all-reduce(sum) per pass) and the
DRO loss at it. One launch covers every check. Design: docs/parallel_design.md sections 2-4.
"""
import dataclasses
import math

import pytest
import torch

from megatron_tempnet.tempnet import TempNetConfig
from megatron_tempnet.tempnet.exact_tau import MAX_ITERS
from torchrun import run_torchrun
from workers.tempnet_tp_worker import run_case, run_exact

pytestmark = pytest.mark.parallel
FP32_TOL = dict(rtol=1e-5, atol=1e-6)  # fp32; the TP reductions reorder sums
S, B, V, M = 5, 3, 2 * 53, 19  # odd sizes; V divisible by TP=2 only


def make_case(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (S, B), generator=g)
    target[0, 0], target[0, 1] = 3, V - 4  # both vocabulary halves own some target
    mask = (torch.rand(S, B, generator=g) > 0.25).float()
    mask[0, :2] = 1.0
    target[mask == 0] = torch.where(torch.rand(int((mask == 0).sum()), generator=g) > 0.5,
                                    -100, 7)  # ignore_index style and valid ids, both masked
    base = dict(hidden_size=M, tau_min=0.3, tau_max=4.0, dropout=0.5)
    logits = torch.randn(S, B, V, generator=g) * 4
    logp = torch.log_softmax(logits.double(), dim=-1)  # dro_exact: rho = the median KL at tau 1
    exact_rho = float((logp.exp() * logp).sum(-1).median()) + math.log(V)
    raw = dataclasses.asdict(TempNetConfig(**base, input_convention="raw"))
    shifted = dataclasses.asdict(TempNetConfig(**base, input_convention="max_shifted"))
    return {"logits": logits, "exact_rho": exact_rho, "exact_bounds": (0.3, 4.0),
            "target": target,
            "loss_mask": mask, "rho": float(torch.rand((), generator=g)) * 4,
            "init_seed": seed % 100003, "dropout_seed": seed % 7919 + 1,
            "runs": [("raw-eval", raw, False), ("raw-train", raw, True),
                     ("max_shifted-train", shifted, True)]}


def test_tempnet_tp2_matches_tp1(tmp_path, seed):
    case = make_case(seed)
    torch.save(case, tmp_path / "case.pt")
    ranks = run_torchrun("tempnet_tp_worker.py", tmp_path, str(tmp_path / "case.pt"))
    assert [r["tp_rank"] for r in ranks] == [0, 1]

    for name, cfg_dict, train in case["runs"]:
        ref = run_case(case, TempNetConfig(**cfg_dict), train, 0, 1, None)  # TP=1, no group
        tp = [r[name] for r in ranks]
        where = f"{name} (seed {seed}; TEMPNET_TEST_SEED={seed} replays it)"
        # replicated outputs: identical on both ranks, equal to TP=1
        assert torch.equal(tp[0]["tau"], tp[1]["tau"]), where
        assert torch.equal(tp[0]["loss"], tp[1]["loss"]), where
        torch.testing.assert_close(tp[0]["tau"], ref["tau"], **FP32_TOL, msg=where)
        torch.testing.assert_close(tp[0]["loss"], ref["loss"], **FP32_TOL, msg=where)
        for key, value in ref["stats"].items():
            for r in tp:
                torch.testing.assert_close(r["stats"][key], value, **FP32_TOL,
                                           msg=f"stats[{key}]: {where}")
        # sharded gradients: the logits' and W1's vocabulary slices
        torch.testing.assert_close(torch.cat([r["logits_grad"] for r in tp], dim=-1),
                                   ref["logits_grad"], **FP32_TOL, msg=f"logits grad: {where}")
        torch.testing.assert_close(torch.cat([r["grads"]["w1"] for r in tp], dim=1),
                                   ref["grads"]["w1"], **FP32_TOL, msg=f"w1 grad: {where}")
        # replicated parameters: bitwise equal across TP ranks, equal to TP=1
        for pname, grad in ref["grads"].items():
            if pname == "w1":
                continue
            assert torch.equal(tp[0]["grads"][pname], tp[1]["grads"][pname]), (pname, where)
            torch.testing.assert_close(tp[0]["grads"][pname], grad, **FP32_TOL,
                                       msg=f"{pname} grad: {where}")
        # collectives: loss <= megatron-core's vocab-parallel CE (2, the fused one's), head 1 or 2
        mcore = ranks[0]["megatron"]
        counts = tp[0]["counts"]
        assert counts["loss"] <= mcore["count"] and counts["loss"] <= 2, (counts, mcore, where)
        if mcore["fused_count"] is not None:
            assert counts["loss"] <= mcore["fused_count"], (counts, mcore)
        assert counts["backward"] == 0, (counts, where)
        assert counts["head"] == (1 if cfg_dict["input_convention"] == "raw" else 2), where
        assert ref["counts"] == {"head": 0, "loss": 0, "backward": 0}  # no group: no collective

    # the logged plain CE is megatron-core's CE on the kept tokens
    keep = case["loss_mask"] > 0
    mcore_ce = ranks[0]["megatron"]["ce"][keep].mean()
    torch.testing.assert_close(ref["stats"]["ce"], mcore_ce, **FP32_TOL, msg=f"seed {seed}")

    # checkpoint layout: W1 TP-sharded along the vocabulary, the rest replicated
    for rank, r in enumerate(ranks):
        shape, offset, _ = r["sharded"]["tempnet.w1"]
        assert shape == (M, V) and offset == (0, rank * V // 2), r["sharded"]
        shape, offset, _ = r["sharded"]["tempnet.w2"]
        assert shape == (M, M) and offset == (0, 0), r["sharded"]

    # the exact tau* (loss_mode "dro_exact") and the DRO loss at it
    ref = run_exact(case, 0, 1, None)
    tp = [r["exact"] for r in ranks]
    where = f"exact tau (seed {seed}; TEMPNET_TEST_SEED={seed} replays it)"
    lo, hi = case["exact_bounds"]
    assert ((ref["tau"] > lo) & (ref["tau"] < hi)).any(), where  # roots, not only bounds
    assert torch.equal(tp[0]["tau"], tp[1]["tau"]), where
    torch.testing.assert_close(tp[0]["tau"], ref["tau"], **FP32_TOL, msg=where)
    torch.testing.assert_close(tp[0]["loss"], ref["loss"], **FP32_TOL, msg=where)
    for key, value in ref["stats"].items():
        torch.testing.assert_close(tp[0]["stats"][key], value, **FP32_TOL, msg=f"{key}: {where}")
    torch.testing.assert_close(torch.cat([r["logits_grad"] for r in tp], dim=-1),
                               ref["logits_grad"], **FP32_TOL, msg=f"logits grad: {where}")
    # collectives: all-reduce(max) of [t], the bounds' packed sums [t, 6], then one packed [n, 3]
    # per Newton pass over the n rows not converged yet; the same sequence on both ranks
    calls = tp[0]["solver_calls"]
    assert calls == tp[1]["solver_calls"] and ref["solver_calls"] == [], where
    t = S * B
    assert calls[:2] == [(t,), (t, 6)] and 2 < len(calls) <= 2 + MAX_ITERS, (calls, where)
    assert all(len(c) == 2 and c[0] <= t and c[1] == 3 for c in calls[2:]), (calls, where)
