"""torchrun worker (2 processes): the scale features through the real entry point, each against
the same run without it. One launch, several runs (``train.build`` re-initializes the process
groups). Dropout is off, so every layout computes the same function of the same data.

grads: one iteration at TP=2 without the distributed optimizer (``main_grad`` then holds the
all-reduced gradient of every parameter of this rank's shard; global batch 4: two accumulated
micro-batches, half the Triton-interpreter time of fused_linear at 8): the losses and every
gradient, for GPT and LLaMA with TempNet (tempnet_dro): base and sp (--sequence-parallel)
through the reference and the fused_linear loss; through the reference also selective
(--recompute-granularity selective), full (full / uniform 1), block (full / block 1) and
sp_full (SP + full / uniform 2).
history: 3 iterations (the logged losses and grad norms) of the layouts that place the weights
differently: dp (TP=1, PP=1, DP=2: the reference), pp (PP=2, saving at 2 for the HF export),
vp (PP=2 x VP=2), overlap (DP=2, distributed optimizer, --overlap-grad-reduce
--overlap-param-gather, small buckets), each from the same weights (a 1-iteration checkpoint
loaded with --finetune: the layouts would initialise differently); vp and overlap also
checkpointed at 2 and resumed to 3.

Usage: scale_worker.py <data prefix> <tokenizer model> <work dir>
"""
import sys
from pathlib import Path

import torch

import megatron_tempnet.train as entry
from megatron_tempnet.arguments import parse_args
from torchrun import save_rank_result

DATA, TOKENIZER, WORK = sys.argv[1], sys.argv[2], Path(sys.argv[3])


def flags(*extra, model="tiny-llama", iters=1, tp=1, pp=1, gbs=8):
    return ["--model", model, "--data-path", DATA, "--tokenizer-model", TOKENIZER,
            "--split", "99,1,0", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", str(gbs), "--lr", "5e-3", "--min-lr", "5e-4",
            "--lr-warmup-iters", "0", "--log-interval", "1", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--eval-iters", "0",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--tempnet-loss-mode", "tempnet_dro", "--tempnet-hidden-size", "16",
            "--tempnet-rho", "4.0", "--tempnet-dropout", "0", "--train-iters", str(iters),
            *extra]


def grads(*extra, **kw):
    """(lm loss, dro loss, {name: main_grad}) after one iteration."""
    t = entry.build(parse_args(flags("--use-distributed-optimizer", "false", *extra, gbs=4,
                                     **kw)))
    state = t.train()
    metrics = state.metrics[-1][1] if state.metrics else {}
    named = {n: p.main_grad.detach().clone() for chunk in t.model_chunks
             for n, p in chunk.module.named_parameters() if p.requires_grad}
    return metrics.get("lm loss"), metrics.get("dro loss"), named


INIT = str(WORK / "init")  # the weights every history starts from (layouts draw their own)


def history(*extra, start=("--load", INIT, "--finetune"), **kw):
    """[(iteration, lm loss, dro loss, grad norm)] of 3 iterations (last pipeline stage), from
    the weights of INIT (``--finetune``: iteration 0, fresh optimizer, first sample)."""
    t = entry.build(parse_args(flags(*start, *extra, iters=kw.pop("iters", 3), **kw)))
    state = t.train()
    return [(i, m["lm loss"], m["dro loss"], m["grad norm"]) for i, m in state.metrics]


def main():
    r = {}
    full = ("--recompute-granularity", "full", "--recompute-method")
    for model in ("tiny-gpt", "tiny-llama"):
        for impl in ("reference", "fused_linear"):
            key = f"{model}/{impl}"
            common = ("--dro-loss-impl", impl)
            r[key] = {
                "base": grads(*common, model=model, tp=2),
                "sp": grads(*common, "--sequence-parallel", model=model, tp=2)}
            if impl == "fused_linear":
                continue
            r[key] |= {
                "selective": grads(*common, "--recompute-granularity", "selective",
                                   model=model, tp=2),
                "full": grads(*common, *full, "uniform", "--recompute-num-layers", "1",
                              model=model, tp=2),
                "block": grads(*common, *full, "block", "--recompute-num-layers", "1",
                               model=model, tp=2),
                "sp_full": grads(*common, "--sequence-parallel", *full, "uniform",
                                 "--recompute-num-layers", "2", model=model, tp=2),
            }
    entry.build(parse_args(flags("--save", INIT))).train()  # 1 iteration: the shared start
    r["dp"] = history()
    r["pp"] = history("--save", str(WORK / "pp"), "--save-interval", "2", pp=2)
    r["vp"] = history("--virtual-pipeline-model-parallel-size", "2", pp=2)
    r["overlap"] = history("--overlap-grad-reduce", "--overlap-param-gather",
                           "--ddp-bucket-size", "2000")
    save = str(WORK / "vp")
    r["vp_saved"] = history("--virtual-pipeline-model-parallel-size", "2", "--save", save,
                            "--save-interval", "2", pp=2)
    r["vp_resumed"] = history("--virtual-pipeline-model-parallel-size", "2", start=(
        "--load", f"{save}/iter_0000002"), pp=2)
    save = str(WORK / "overlap")
    r["overlap_saved"] = history("--overlap-grad-reduce", "--overlap-param-gather", "--save",
                                 save, "--save-interval", "2")
    r["overlap_resumed"] = history("--overlap-grad-reduce", "--overlap-param-gather", start=(
        "--load", f"{save}/iter_0000002"))
    # a TP=2 checkpoint whose vocabulary padding differs at TP=1 (500 tokens, divisible by 100:
    # 600 rows at TP=2, 500 at TP=1) resumes and evaluates at TP=1 with its own padding
    pad, div = str(WORK / "pad"), ("--make-vocab-size-divisible-by", "100")
    r["pad_saved"] = history(*div, "--save", pad, "--save-interval", "2", start=(), tp=2)
    r["pad_resumed_tp1"] = history(*div, start=("--load", f"{pad}/iter_0000002"))
    from megatron_tempnet.evaluate import main as evaluate_main
    r["pad_eval_tp1"] = evaluate_main(flags(*div, "--load", pad, "--eval-iters", "1"))
    save_rank_result(r)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
