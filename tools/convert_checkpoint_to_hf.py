#!/usr/bin/env python3
"""Checkpoint (saved at any TP/PP, or by DeepSpeed) -> Hugging Face directory.

    python tools/convert_checkpoint_to_hf.py --load checkpoints/run1 --output hf/run1 \
        --tokenizer-model tokenizer.model

    python -m megatron_tempnet.evaluate --load checkpoints/run1 ... --metrics-jsonl eval.jsonl
    python tools/convert_checkpoint_to_hf.py ... --eval-jsonl eval.jsonl   # model card table

Writes config.json, model.safetensors (sharded when large), generation_config.json (samples at
temperature 1: the model's own tau), a fast tokenizer with the ids of training (tokenizer.json,
tokenizer_config.json; a SentencePiece model also as tokenizer.model) and a model card
(README.md). A TempNet model becomes TempNetLlamaForCausalLM / TempNetGPT2ForCausalLM, whose
code (torch and transformers only) the directory carries: load it with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``, or after
``import megatron_tempnet.hf.modeling`` without; a plain one LlamaForCausalLM / GPT2LMHeadModel.
The model configuration is read from the checkpoint itself. A DeepSpeed checkpoint is first
converted to a megatron-core one (tools/convert_deepspeed_checkpoint.py: one process per saved
TP rank) in a temporary directory beside --output. Prints what it wrote (class, dtype,
parameters, TempNet settings). Runs on the CPU on a free port.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_tempnet.cli import run_command  # noqa: E402
from megatron_tempnet.hf.convert import checkpoint_to_hf, describe_hf_dir  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint save dir or one iter_* dir")
    p.add_argument("--output", required=True, help="new (or empty) directory to write")
    p.add_argument("--tokenizer-model", help="SentencePiece .model or tokenizers .json to copy")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--eval-jsonl", help="the --metrics-jsonl file of python -m "
                   "megatron_tempnet.evaluate: the model card's evaluation table (the line of "
                   "the exported iteration, else the last)")
    p.add_argument("--training-data", help="one line on the training data for the model card")
    args = p.parse_args(argv)
    out = checkpoint_to_hf(args.load, args.output, args.tokenizer_model, DTYPES[args.dtype],
                           eval_jsonl=args.eval_jsonl, training_data=args.training_data)
    print(describe_hf_dir(out))
    return 0


def main(argv=None) -> int:
    """_main; a bad input ends as one line ``error: ...`` and exit code 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
