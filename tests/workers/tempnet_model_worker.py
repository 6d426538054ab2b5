"""torchrun worker: TempNet GPT/LLaMA models at TP=2, PP=2 and DP=2; loss, reports, gradients.

Reads the cases written by tests/parallel/test_tempnet_model_parity.py (full TP=1 weights with
TempNet, TempNetConfig, global batch, the layouts to run), runs one forward/backward through
megatron-core DDP and the pipeline schedule per layout, and saves for each: this rank's
coordinates, its reduced micro-batch reports (last stage), its local gradients (main_grad) and,
at TP=2, the TempNet head's sharded-state-dict view.
"""
import sys

import torch

from megatron_tempnet.config import ModelConfig
from megatron_tempnet.models.sharding import full_to_local, load_local
from megatron_tempnet.models.tempnet_gpt import build_tempnet_model, loss_channels
from megatron_tempnet.parallel import initialize, shutdown
from megatron_tempnet.tempnet import TempNetConfig
from megatron_tempnet.training.ddp import wrap_ddp
from megatron_tempnet.training.step import ReportSpec, forward_backward, reduce_reports
from batches import rank_micro_batches
from torchrun import save_rank_result


def run_layout(case: dict, tp: int, pp: int) -> dict:
    ctx = initialize(tp=tp, pp=pp, seed=7)
    cfg, tcfg = ModelConfig(**case["cfg"]), TempNetConfig(**case["tempnet"])
    model = build_tempnet_model(cfg, tcfg, ctx)
    load_local(model, full_to_local(case["full"], cfg, ctx.tp_rank, tp, ctx.pp_rank, pp))
    ddp = wrap_ddp(model)
    ddp.zero_grad_buffer()

    batch = case["batch"]
    micro = rank_micro_batches(batch, ctx)
    torch.manual_seed(case["dropout_seed"])  # the same default generator on every rank
    reports = forward_backward([ddp], iter(micro), num_microbatches=len(micro),
                               seq_length=batch["tokens"].shape[1], micro_batch_size=1,
                               spec=ReportSpec(loss_channels(tcfg)))
    result = {"tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank,
              "reports": ({k: reduce_reports(reports, k) for k in reports[0]}
                          if ctx.is_last_stage else None),
              "grads": {n: p.main_grad.clone() for n, p in model.named_parameters()}}
    if model.tempnet is not None:
        w1 = model.sharded_state_dict()["tempnet." + model.tempnet.SHARDED]
        result["w1_sharding"] = (tuple(w1.local_shape), tuple(w1.global_shape),
                                 tuple(w1.global_offset))
    return result


def main(path):
    cases = torch.load(path, weights_only=False)
    results = {name: run_layout(case, tp, pp) for name, case in cases.items()
               for tp, pp in [case["layout"]]}
    save_rank_result(results)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
