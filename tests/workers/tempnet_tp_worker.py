"""torchrun worker: the TempNet head and the DRO loss at TP=2 on the full inputs written by
tests/parallel/test_tempnet_tp.py, plus the collective counts of our loss and of megatron-core's
vocab-parallel cross-entropy on the same inputs, the head's sharded state dict, and the exact
tau* of loss_mode "dro_exact" with the DRO loss at it.

``run_case`` and ``run_exact`` are also what the test runs in its own process at TP=1
(tp_group None): one code.
"""
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: torchrun helpers

from megatron_tempnet.tempnet import TempNetConfig, TempNetHead, dro_loss, solve_tau  # noqa: E402


@contextmanager
def count_all_reduces():
    """Count torch.distributed.all_reduce calls (ours and megatron-core's) inside the block."""
    calls = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = original


def run_case(case: dict, cfg: TempNetConfig, train: bool, tp_rank: int, tp_size: int, group):
    """Head + DRO loss forward/backward on this rank's vocab slice of the case's full logits.

    Returns tau, loss, stats, the logits-shard grad, the head's grads and collective counts.
    """
    logits = case["logits"]  # [s, b, V] fp32
    vocab = logits.shape[-1]
    v_local = vocab // tp_size
    shard = logits[..., tp_rank * v_local:(tp_rank + 1) * v_local].clone().requires_grad_(True)
    head = TempNetHead(cfg, vocab, tp_rank=tp_rank, tp_size=tp_size, seed=case["init_seed"])
    head.train(train)
    torch.manual_seed(case["dropout_seed"])  # the default generator: same mask on all TP ranks
    with count_all_reduces() as head_calls:
        tau = head(shard, group)  # [s, b]
    with count_all_reduces() as loss_calls:
        loss, stats = dro_loss(shard, case["target"], tau, case["loss_mask"], case["rho"], group)
    with count_all_reduces() as backward_calls:
        loss.backward()
    return {"tau": tau.detach(), "loss": loss.detach(), "stats": stats,
            "logits_grad": shard.grad, "grads": {n: p.grad for n, p in head.named_parameters()},
            "counts": {"head": len(head_calls), "loss": len(loss_calls),
                       "backward": len(backward_calls)}}


def run_exact(case: dict, tp_rank: int, tp_size: int, group) -> dict:
    """tau* (exact_tau.solve_tau) on this rank's vocab slice, the DRO loss at it (detached
    tau*, loss_mode "dro_exact") and its logits-shard gradient, with the collective counts."""
    logits = case["logits"]
    v_local = logits.shape[-1] // tp_size
    shard = logits[..., tp_rank * v_local:(tp_rank + 1) * v_local].clone().requires_grad_(True)
    lo, hi = case["exact_bounds"]
    with count_all_reduces() as solver_calls:
        tau = solve_tau(shard, case["exact_rho"], lo, hi, group)  # [s, b]
    loss, stats = dro_loss(shard, case["target"], tau, case["loss_mask"], case["exact_rho"],
                           group)
    loss.backward()
    return {"tau": tau, "loss": loss.detach(), "stats": stats, "logits_grad": shard.grad,
            "solver_calls": solver_calls}


def megatron_ce(case: dict, tp_rank: int, tp_size: int, group) -> dict:
    """megatron-core's vocab-parallel CE (unfused, and fused where it runs) on the same shard."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    v_local = case["logits"].shape[-1] // tp_size
    shard = case["logits"][..., tp_rank * v_local:(tp_rank + 1) * v_local]
    with count_all_reduces() as calls:
        ce = vocab_parallel_cross_entropy(shard.clone(), case["target"])
    out = {"ce": ce.detach(), "count": len(calls), "fused_count": None}
    try:
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
        with count_all_reduces() as fused_calls:
            fused_vocab_parallel_cross_entropy(shard.clone(), case["target"], group)
        out["fused_count"] = len(fused_calls)
    except Exception as e:  # the fused path may need a GPU toolchain; the unfused one is the bar
        out["fused_error"] = repr(e)
    return out


def sharded_layout(case: dict, cfg: TempNetConfig, ctx) -> dict:
    head = TempNetHead(cfg, case["logits"].shape[-1], ctx.tp_rank, ctx.tp_size)
    sd = head.sharded_state_dict("tempnet.", metadata={"tp_group": ctx.tp_group,
                                                        "dp_cp_group": ctx.dp_group})
    return {k: (tuple(v.global_shape), tuple(v.global_offset), v.replica_id)
            for k, v in sd.items()}


def main(path):
    from megatron_tempnet.parallel import initialize, shutdown
    from torchrun import save_rank_result

    case = torch.load(path, weights_only=False)
    ctx = initialize(tp=2, pp=1, seed=case["init_seed"])
    results = {}
    for name, cfg_dict, train in case["runs"]:
        results[name] = run_case(case, TempNetConfig(**cfg_dict), train, ctx.tp_rank,
                                 ctx.tp_size, ctx.tp_group)
    results["megatron"] = megatron_ce(case, ctx.tp_rank, ctx.tp_size, ctx.tp_group)
    results["exact"] = run_exact(case, ctx.tp_rank, ctx.tp_size, ctx.tp_group)
    results["sharded"] = sharded_layout(case, TempNetConfig(**case["runs"][0][1]), ctx)
    results["tp_rank"] = ctx.tp_rank
    save_rank_result(results)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
