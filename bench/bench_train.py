"""Training-step throughput: tokens/s, TFLOP/s and MFU per GPU of forward + backward + optimizer.

One process, one device. For each combination of loss mode (--loss-modes: "ce" = plain
megatron-core GPTModel, "tempnet_dro" = TempNet head + DRO loss) and core attention
(--attention-backends: "local" = megatron-core's unfused DotProductAttention, "sdpa" =
models/specs.py), a fresh model stage is built and trained on random tokens exactly as
training/loop.py does: megatron-core DDP -> the schedule's forward/backward (one micro-batch of
--micro-batch-size x --seq-length) -> megatron-core optimizer step (Adam, bf16 with fp32 main
weights when --precision bf16). --warmup steps are run first and not timed; then --steps timed
steps (synchronised on the GPU).

FLOPs per token: the project's accounting, ``training.flops.flops_per_token`` (Megatron-LM's
GEMM count, GQA and SwiGLU aware, the same figure the training log's MFU uses), for the LM only:
TempNet's FLOPs are not counted, so TempNet rows show its cost as lower throughput for the same
useful work. "MFU 6N" uses docs/gpu_baselines.md's rule instead, 6 * N + 12 * L * H * S (N: all LM
parameters, embedding included), for comparison with the peers listed there.
MFU = achieved FLOP/s / peak (``training.flops.peak_flops``: 989 TFLOP/s for an H100 in bf16,
--peak-tflops overrides; no MFU on the CPU unless --peak-tflops is given).

    python bench/bench_train.py                                   # llama-1b, one GPU
    python bench/bench_train.py --preset tiny-llama --seq-length 128 --steps 3   # CPU smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_tempnet.config import ATTENTION_BACKENDS, TrainConfig, load_model_preset  # noqa: E402,E501
from megatron_tempnet.training.flops import flops_per_token, peak_flops  # noqa: E402
from megatron_tempnet.models.tempnet_gpt import (TEMPNET_PARAM_ATTR,  # noqa: E402
                                                 build_tempnet_model, loss_channels)
from megatron_tempnet.parallel import initialize, shutdown  # noqa: E402
from megatron_tempnet.tempnet import TempNetConfig  # noqa: E402
from megatron_tempnet.tempnet.config import DRO_LOSS_IMPLS, LOSS_MODES  # noqa: E402
from megatron_tempnet.training.ddp import wrap_ddp  # noqa: E402
from megatron_tempnet.training.optim import (build_optimizer, build_scheduler,  # noqa: E402
                                             precision_dtype)
from megatron_tempnet.training.reports import ReportSpec  # noqa: E402
from megatron_tempnet.training.step import megatron_step  # noqa: E402


def random_batches(vocab: int, b: int, s: int, device):
    g = torch.Generator().manual_seed(0)
    while True:
        tokens = torch.randint(0, vocab, (b, s + 1), generator=g).to(device)
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
               "position_ids": torch.arange(s, device=device).expand(b, s),
               "loss_mask": torch.ones(b, s, device=device)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg, loss_mode: str, attention: str, args, ctx, impl: str = "auto") -> dict:
    """Build, warm up and time one configuration; returns its row values."""
    train = TrainConfig(micro_batch_size=args.micro_batch_size,
                        global_batch_size=args.micro_batch_size, seq_length=args.seq_length,
                        train_iters=args.warmup + args.steps, precision=args.precision,
                        lr=1e-4, min_lr=1e-5)
    dtype = precision_dtype(args.precision)
    torch.manual_seed(0)
    tempnet_cfg = TempNetConfig(loss_mode=loss_mode, dro_loss_impl=impl)
    model = build_tempnet_model(dataclasses.replace(cfg, attention_backend=attention), tempnet_cfg,
                                ctx, params_dtype=dtype, use_transformer_engine=False)
    lm_params = sum(p.numel() for p in model.parameters()
                    if not getattr(p, TEMPNET_PARAM_ATTR, False))
    chunks = [wrap_ddp(model, use_distributed_optimizer=True)]
    optimizer = build_optimizer(chunks, train, use_distributed_optimizer=True,
                                tempnet_cfg=tempnet_cfg)
    scheduler = build_scheduler(optimizer, train)
    batches = random_batches(cfg.vocab_size, args.micro_batch_size, args.seq_length, ctx.device)

    step = partial(megatron_step(chunks, optimizer, scheduler, train,
                                 ReportSpec.build(tempnet_cfg, loss_channels(tempnet_cfg), 32)),
                   batches, 1)

    for _ in range(args.warmup):
        step()
    sync(ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(ctx.device)
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_s = args.micro_batch_size * args.seq_length / seconds
    achieved = tokens_per_s * flops_per_token(cfg, args.seq_length,
                                              vocab_size=cfg.padded_vocab_size(ctx.tp_size))
    achieved_6n = tokens_per_s * (6 * lm_params + 12 * cfg.num_layers * cfg.hidden_size
                                  * args.seq_length)
    peak = peak_flops(ctx.device, args.precision, args.peak_tflops)
    row = {"loss mode": loss_mode, "attention": attention, "impl": impl,
           "ms/step": 1000 * seconds,
           "tokens/s": tokens_per_s, "TFLOP/s": achieved / 1e12,
           "MFU": achieved / peak if peak else None,
           "MFU 6N": achieved_6n / peak if peak else None,
           "peak GiB": (torch.cuda.max_memory_allocated() / 2**30
                        if ctx.device.type == "cuda" else None),
           "params": lm_params}
    return row  # the model and optimizer are freed with this frame (see main)


def fmt(row: dict) -> list[str]:
    if "error" in row:
        return [row["loss mode"], row["attention"], row["impl"], row["error"], "", "", "", "",
                ""]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    return [row["loss mode"], row["attention"], row["impl"], f"{row['ms/step']:.1f}",
            f"{row['tokens/s']:,.0f}", f"{row['TFLOP/s']:.3g}", pct(row["MFU"]),
            pct(row["MFU 6N"]), "n/a" if row["peak GiB"] is None else f"{row['peak GiB']:.1f}"]


def table(rows: list[dict]) -> str:
    head = ["loss mode", "attention", "DRO impl", "ms/step", "tokens/s", "TFLOP/s", "MFU",
            "MFU 6N", "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(fmt(r)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-1b", help="configs/models/<preset>.yaml")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--precision", default=None, choices=["bf16", "fp32", "fp16"],
                   help="default: bf16 on a GPU, fp32 on the CPU (where bf16 is emulated)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--loss-modes", nargs="+", default=["ce", "tempnet_dro"],
                   choices=list(LOSS_MODES))
    p.add_argument("--attention-backends", nargs="+", default=["local", "sdpa"],
                   choices=list(ATTENTION_BACKENDS))
    p.add_argument("--dro-loss-impls", nargs="+", default=["auto"], choices=DRO_LOSS_IMPLS,
                   help="--dro-loss-impl values to compare for the DRO loss modes")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="default: the preset's, else 32000")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: training.flops.peak_flops' table on a "
                        "GPU, none on the CPU)")
    args = p.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29555")}
    ctx = initialize(tp=1, pp=1, seed=1234, environ=env)
    cfg = load_model_preset(args.preset)
    if args.vocab_size or cfg.vocab_size is None:
        cfg.vocab_size = args.vocab_size or 32000
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.seq_length)
    device = (torch.cuda.get_device_name() if ctx.device.type == "cuda"
              else f"CPU ({platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads)")
    print(f"# {args.preset}: seq {args.seq_length}, micro-batch {args.micro_batch_size}, "
          f"{args.precision}, {args.warmup} warmup + {args.steps} timed steps; {device}; "
          f"torch {torch.__version__}", flush=True)

    rows = []
    for loss_mode in args.loss_modes:
        impls = ["n/a"] if loss_mode == "ce" else args.dro_loss_impls  # plain CE: megatron's
        for attention in args.attention_backends:
            for impl in impls:
                try:
                    rows.append(measure(cfg, loss_mode, attention, args, ctx,
                                        "auto" if impl == "n/a" else impl))
                    rows[-1]["impl"] = impl
                except torch.OutOfMemoryError:
                    rows.append({"loss mode": loss_mode, "attention": attention, "impl": impl,
                                 "error": "OOM"})
                gc.collect()  # free the previous configuration before building the next
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                print(f"  done: {loss_mode} / {attention} / {impl}", file=sys.stderr,
                      flush=True)
    params = next((r["params"] for r in rows if "params" in r), 0)
    print(f"# LM parameters {params / 1e6:,.2f}M; FLOPs/token: training.flops (MFU), "
          "6N + 12*L*H*S (MFU 6N)")
    print(table(rows))
    shutdown()


if __name__ == "__main__":
    main()
