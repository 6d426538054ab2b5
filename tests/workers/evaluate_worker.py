"""torchrun worker: validation metrics (training/evaluate.py) at TP=2, PP=2 and DP=2.

Reads the cases written by tests/parallel/test_evaluate_tp.py (full TP=1 weights, configs, the
validation micro-batches, the layout), builds this rank's stage with its shards, wraps it in
megatron-core DDP as training does, and saves, per layout, this rank's coordinates and the dict
``evaluate`` returned (every rank gets one: broadcast from the last stage).
"""
import sys

import torch

from megatron_tempnet.config import ModelConfig
from megatron_tempnet.models.sharding import full_to_local, load_local
from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
from megatron_tempnet.parallel import initialize, shutdown
from megatron_tempnet.tempnet import TempNetConfig
from megatron_tempnet.training.ddp import wrap_ddp
from megatron_tempnet.training.evaluate import evaluate
from torchrun import save_rank_result


def run_layout(case: dict, tp: int, pp: int) -> dict:
    ctx = initialize(tp=tp, pp=pp, seed=7)
    cfg, tcfg = ModelConfig(**case["cfg"]), TempNetConfig(**case["tempnet"])
    model = build_tempnet_model(cfg, tcfg, ctx)
    load_local(model, full_to_local(case["full"], cfg, ctx.tp_rank, tp, ctx.pp_rank, pp))
    chunks = [wrap_ddp(model)]
    micro = case["micro_batches"][ctx.dp_rank::ctx.dp_size]  # this DP rank's share
    num_batches = case["num_batches"]
    result = evaluate(chunks, iter(micro), num_batches, ctx, seq_length=case["seq_length"],
                      micro_batch_size=case["micro_batch_size"],
                      num_microbatches=len(micro) // num_batches)
    return {"tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank,
            "result": result, "training": model.training}


def main(path):
    cases = torch.load(path, weights_only=False)
    results = {name: run_layout(case, *case["layout"]) for name, case in cases.items()}
    save_rank_result(results)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
