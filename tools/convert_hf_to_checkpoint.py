#!/usr/bin/env python3
"""Hugging Face LLaMA or GPT-2 directory (or a TempNet export of this project) -> our
checkpoint (model weights), for finetuning or training TempNet on a frozen LM:

    python tools/convert_hf_to_checkpoint.py --input hf/llama2-7b --save checkpoints/llama2-7b \
        --target-tensor-parallel-size 8
    torchrun ... -m megatron_tempnet.train --load checkpoints/llama2-7b --finetune \
        --tempnet-loss-mode tempnet_dro --tempnet-training-mode frozen_lm ...

dist_checkpointing reshards the weights to the training run's TP/PP; the vocabulary is padded
for --target-tensor-parallel-size (Megatron pads to a multiple of divisible-by x TP). A TempNet
export (tools/convert_checkpoint_to_hf.py of a TempNet run: model_type tempnet_llama /
tempnet_gpt2) keeps its TempNet weights, its settings (in the checkpoint's run record) and the
padded vocabulary TempNet was trained on: finetune it with the same --tempnet-* settings.
Prints what it wrote (model, padding, dtype, parameters, TempNet). Runs in one process on a
free port.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tempnet.cli import run_command  # noqa: E402
from megatron_tempnet.hf.convert import describe_checkpoint, hf_to_checkpoint  # noqa: E402


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="Hugging Face model directory")
    p.add_argument("--save", required=True,
                   help="checkpoint directory to write (holding no checkpoint yet)")
    p.add_argument("--make-vocab-size-divisible-by", type=int,
                   help="default 128; a TempNet export keeps its own padding")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    args = p.parse_args(argv)
    path = hf_to_checkpoint(args.input, args.save, args.make_vocab_size_divisible_by,
                            args.target_tensor_parallel_size)
    print(describe_checkpoint(path))
    return 0


def main(argv=None) -> int:
    """_main; a bad input ends as one line ``error: ...`` and exit code 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
