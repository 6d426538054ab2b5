"""Every DRO-loss implementation (reference, fused Triton, fused_linear) with TempNet at TP=2
(torchrun, 2 processes, gloo; Triton's interpreter without a GPU) equals its TP=1 result on the
same full inputs: loss, tau, and the gradients of the hidden states, the output weight's
vocabulary rows and TempNet's parameters. One launch covers every implementation.
"""
import pytest
import torch

from torchrun import run_torchrun
from workers.dro_kernels_worker import run_case

pytestmark = [pytest.mark.parallel, pytest.mark.triton]
FP32_TOL = dict(rtol=2e-5, atol=2e-6)  # fp32; the TP reductions reorder sums
T, H, V, M = 13, 12, 2 * 67, 9  # odd sizes; V divisible by TP=2 only
RUNS = [("reference", "dro"), ("fused", "dro"), ("fused", "tempered_ce"),
        ("fused_linear", "dro"), ("fused_linear", "tempered_ce")]


def make_case(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (T,), generator=g)
    target[0], target[1] = 3, V - 4  # both vocabulary halves own some target
    mask = (torch.rand(T, generator=g) > 0.25).float()
    mask[:2] = 1.0
    target[mask == 0] = -100
    return {"hidden": torch.randn(T, H, generator=g), "weight": torch.randn(V, H, generator=g),
            "target": target, "loss_mask": mask, "rho": float(torch.rand((), generator=g)) * 4,
            "init_seed": seed % 100003, "chunk": 4, "runs": RUNS,
            "tempnet": dict(hidden_size=M, tau_min=0.3, tau_max=4.0, dropout=0.0,
                            loss_mode="tempnet_dro")}


def test_dro_impls_tp2_match_tp1(tmp_path, seed):
    case = make_case(seed)
    torch.save(case, tmp_path / "case.pt")
    ranks = run_torchrun("dro_kernels_worker.py", tmp_path, str(tmp_path / "case.pt"))
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    for run in RUNS:
        ref = run_case(case, *run, 0, 1, None)  # TP=1, no group
        tp = [r[run] for r in ranks]
        where = f"{run} (TEMPNET_TEST_SEED={seed} replays it)"
        for key in ("loss", "tau"):
            assert torch.equal(tp[0][key], tp[1][key]), (key, where)
            torch.testing.assert_close(tp[0][key], ref[key], **FP32_TOL, msg=f"{key}: {where}")
        # each rank's hidden grad is its vocabulary half's term (summed by megatron's TP region)
        torch.testing.assert_close(tp[0]["hidden_grad"] + tp[1]["hidden_grad"],
                                   ref["hidden_grad"], **FP32_TOL, msg=f"d hidden: {where}")
        torch.testing.assert_close(torch.cat([r["weight_grad"] for r in tp]), ref["weight_grad"],
                                   **FP32_TOL, msg=f"d weight: {where}")
        torch.testing.assert_close(torch.cat([r["grads"]["w1"] for r in tp], dim=1),
                                   ref["grads"]["w1"], **FP32_TOL, msg=f"d w1: {where}")
        for name, grad in ref["grads"].items():
            if name != "w1":
                assert torch.equal(tp[0]["grads"][name], tp[1]["grads"][name]), (name, where)
                torch.testing.assert_close(tp[0]["grads"][name], grad, **FP32_TOL,
                                           msg=f"d {name}: {where}")
