#!/usr/bin/env python
"""Parameters, memory per GPU and FLOPs per step of a run, before it is queued.

    python tools/estimate.py --config configs/runs/llama2-7b-tempnet.yaml --nodes 4
    python tools/estimate.py --model llama2-13b --tensor-model-parallel-size 4 \\
        --micro-batch-size 1 --global-batch-size 1024 --seq-length 4096 --precision bf16 \\
        --tempnet-loss-mode tempnet_dro --world-size 64 --sequence-parallel \\
        --recompute-granularity full --recompute-method block --recompute-num-layers 4
    python tools/estimate.py --model llama2-7b --params-only      # exact parameter count

The run is parsed by the trainer's own parser (megatron_tempnet.arguments) and checked by its
``resolve`` for the world size, so every training flag is accepted and means what it means to
the trainer: the layout (--tensor-model-parallel-size, --pipeline-model-parallel-size,
--virtual-pipeline-model-parallel-size, --sequence-parallel) and the recomputation
(--recompute-granularity, --recompute-method, --recompute-num-layers) come from the run YAML's
``parallel:`` / ``train:`` sections or these flags. The options below describe what the run
does not hold: how many GPUs, which attention kernel, the GPU and the assumptions.
The arithmetic and its assumptions: megatron_tempnet/experiments/estimate.py; the layouts it
justifies: docs/parallel_layouts.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tempnet.arguments import parse_args, resolve  # noqa: E402
from megatron_tempnet.config import ConfigError  # noqa: E402
from megatron_tempnet.experiments.estimate import (ACTIVATION_MARGIN,  # noqa: E402
                                                   H100_BF16_DENSE_TFLOPS, H100_MEMORY_GIB,
                                                   count_parameters, explain, layout_from_run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other flag is a training flag (see "
                                       "`python -m megatron_tempnet.train --help`).")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--nodes", type=int, help="number of nodes (x --gpus-per-node GPUs)")
    where.add_argument("--world-size", type=int, help="number of GPUs")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--attention", choices=("flash", "unfused"),
                   help="flash: Transformer Engine / PyTorch SDPA on GPU (no s x s tensors); "
                        "unfused: megatron-core's DotProductAttention (default: unfused for "
                        "--attention-backend local, else flash)")
    p.add_argument("--gpu-memory-gib", type=float, default=H100_MEMORY_GIB,
                   help=f"memory of one GPU (default: H100 80GB = {H100_MEMORY_GIB:.1f} GiB)")
    p.add_argument("--reserve-gib", type=float, default=4.0,
                   help="CUDA context, NCCL buffers, allocator fragmentation (default 4)")
    p.add_argument("--activation-margin", type=float, default=ACTIVATION_MARGIN,
                   help="multiplies the ideal per-layer activation count (default "
                        f"{ACTIVATION_MARGIN}: measured 1.37 for megatron-core's LLaMA layer "
                        "on CPU, 1.00 for GPT; 1.0: Korthikanti's count)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="peak dense TFLOP/s per GPU (default: H100 SXM bf16)")
    p.add_argument("--params-only", action="store_true",
                   help="print the exact parameter count (with and without TempNet) and stop")
    return p


def main(argv=None) -> int:
    args, train_flags = build_parser().parse_known_args(argv)
    run = parse_args(train_flags)
    if run.model.vocab_size is None:
        print("error: the model has no vocab_size: pass --vocab-size (the tokenizer's)",
              file=sys.stderr)
        return 2
    tp, pp = run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size
    name = Path(train_flags[train_flags.index("--config") + 1]).stem \
        if "--config" in train_flags else run.model.family
    if args.params_only:
        with_tn = count_parameters(run.model, run.tempnet, tp, pp)
        without = count_parameters(run.model, None, tp, pp)
        print(f"{name}: {without.total:,} parameters without TempNet, {with_tn.total:,} with "
              f"(loss mode {run.tempnet.loss_mode}); vocabulary {run.model.vocab_size} padded "
              f"to {with_tn.padded_vocab_size} (multiple of "
              f"{run.model.make_vocab_size_divisible_by} x TP {tp})")
        for stage, n in enumerate(with_tn.per_stage_rank):
            print(f"  PP stage {stage}: {n:,} parameters per TP rank")
        return 0
    world = args.world_size or (args.nodes or 1) * args.gpus_per_node
    try:
        resolve(run, world)  # the trainer's own checks of the layout, batch and recomputation
        layout = layout_from_run(run, world, attention=args.attention)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(explain(run.model, layout, run.tempnet, name=name, reserve_gib=args.reserve_gib,
                  capacity_gib=args.gpu_memory_gib, mfu=args.mfu, peak_tflops=args.peak_tflops,
                  activation_margin=args.activation_margin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
