"""torchrun worker: each DRO-loss implementation (reference, fused, fused_linear) with TempNet at
TP=2 on the full inputs written by tests/parallel/test_dro_kernels_tp.py.

``run_case`` is also what the test runs in its own process at TP=1 (tp_group None): one code.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: torchrun helpers

from megatron_tempnet.tempnet import TempNetConfig, TempNetHead, dro_loss  # noqa: E402
from megatron_tempnet.tempnet.fused_linear import fused_linear_dro_loss  # noqa: E402


def run_case(case: dict, impl: str, objective: str, tp_rank: int, tp_size: int, group) -> dict:
    """Loss, tau and every gradient of this rank (vocabulary slices of the logits / output
    weight / W1; the partial d hidden of fused_linear, summed over ranks by the test)."""
    cfg = TempNetConfig(**case["tempnet"])
    hidden, weight = case["hidden"], case["weight"]  # [t, H], [V, H] fp32
    vocab = weight.shape[0]
    rows = slice(tp_rank * vocab // tp_size, (tp_rank + 1) * vocab // tp_size)
    head = TempNetHead(cfg, vocab, tp_rank=tp_rank, tp_size=tp_size, seed=case["init_seed"])
    h = hidden.clone().requires_grad_(True)
    w = weight[rows].clone().requires_grad_(True)
    target, mask = case["target"], case["loss_mask"]
    if impl == "fused_linear":
        loss, _, _, tau = fused_linear_dro_loss(
            h, w, target, mask, lambda z, _rows: head(z, group), case["rho"], group, objective,
            tau_params=list(head.parameters()), chunk_tokens=case["chunk"])
        loss = (loss * mask).sum() / mask.sum()
    else:
        logits = h @ w.t()
        tau = head(logits, group)
        loss, _ = dro_loss(logits, target, tau, mask, case["rho"], group, objective, impl)
    loss.backward()
    return {"loss": loss.detach(), "tau": tau.detach(), "hidden_grad": h.grad,
            "weight_grad": w.grad, "grads": {n: p.grad for n, p in head.named_parameters()}}


def main(path):
    from megatron_tempnet.parallel import initialize, shutdown
    from torchrun import save_rank_result

    case = torch.load(path, weights_only=False)
    ctx = initialize(tp=2, pp=1, seed=case["init_seed"])
    results = {run: run_case(case, *run, ctx.tp_rank, ctx.tp_size, ctx.tp_group)
               for run in case["runs"]}
    results["tp_rank"] = ctx.tp_rank
    save_rank_result(results)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
