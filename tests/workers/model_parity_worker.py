"""torchrun worker: TP=2, PP=2 and DP=2 layouts of each model family, loss and gradients.

Reads the full weights and the global batch written by tests/parallel/test_model_parity.py,
runs one forward/backward through megatron-core DDP and the pipeline schedule at each layout,
and saves per-layout: this rank's coordinates, loss sum/token count (last stage) and its local
gradients with global names.
"""
import sys

import torch

from megatron_tempnet.config import ModelConfig
from megatron_tempnet.models.gpt import build_model
from megatron_tempnet.models.sharding import full_to_local, load_local
from megatron_tempnet.parallel import initialize, shutdown
from megatron_tempnet.training.ddp import wrap_ddp
from megatron_tempnet.training.step import forward_backward, reduce_reports
from batches import rank_micro_batches
from torchrun import save_rank_result


def run_layout(case: dict, tp: int, pp: int) -> dict:
    ctx = initialize(tp=tp, pp=pp, seed=7)
    cfg = ModelConfig(**case["cfg"])
    model = build_model(cfg, ctx)
    load_local(model, full_to_local(case["full"], cfg, ctx.tp_rank, tp, ctx.pp_rank, pp))
    ddp = wrap_ddp(model)
    ddp.zero_grad_buffer()

    batch = case["batch"]
    micro = rank_micro_batches(batch, ctx)
    reports = forward_backward([ddp], iter(micro), num_microbatches=len(micro),
                               seq_length=batch["tokens"].shape[1], micro_batch_size=1)
    grads = {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}
    return {"tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank,
            "loss": reduce_reports(reports) if ctx.is_last_stage else None,
            "grads": grads}


def main(path):
    cases = torch.load(path, weights_only=False)
    results = {}
    for family, case in cases.items():
        for tp, pp in [(2, 1), (1, 2), (1, 1)]:  # world size 2: TP=2, PP=2, DP=2
            results[(family, tp, pp)] = run_layout(case, tp, pp)
    save_rank_result(results)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
