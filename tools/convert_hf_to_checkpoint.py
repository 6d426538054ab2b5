#!/usr/bin/env python3
"""Hugging Face LLaMA or GPT-2 directory -> our checkpoint (model weights), for finetuning or
training TempNet on a frozen LM:

    python tools/convert_hf_to_checkpoint.py --input hf/llama2-7b --save checkpoints/llama2-7b \
        --target-tensor-parallel-size 8
    torchrun ... -m megatron_tempnet.train --load checkpoints/llama2-7b --finetune \
        --tempnet-loss-mode tempnet_dro --tempnet-training-mode frozen_lm ...

dist_checkpointing reshards the weights to the training run's TP/PP; the vocabulary is padded
for --target-tensor-parallel-size (Megatron pads to a multiple of divisible-by x TP).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tempnet.cli import run_command  # noqa: E402
from megatron_tempnet.hf.convert import hf_to_checkpoint  # noqa: E402


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="Hugging Face model directory")
    p.add_argument("--save", required=True,
                   help="checkpoint directory to write (holding no checkpoint yet)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    args = p.parse_args(argv)
    path = hf_to_checkpoint(args.input, args.save, args.make_vocab_size_divisible_by,
                            args.target_tensor_parallel_size)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    """_main; a bad input ends as one line ``error: ...`` and exit code 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
