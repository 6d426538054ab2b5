#!/usr/bin/env python3
"""Checkpoint (saved at any TP/PP) -> Hugging Face directory.

    python tools/convert_checkpoint_to_hf.py --load checkpoints/run1 --output hf/run1 \
        --tokenizer-model tokenizer.model

Writes config.json, model.safetensors (sharded when large), generation_config.json and the
tokenizer file. A TempNet model becomes TempNetLlamaForCausalLM / TempNetGPT2ForCausalLM (load it
after ``import megatron_tempnet.hf.modeling``); a plain one LlamaForCausalLM / GPT2LMHeadModel.
The model configuration is read from the checkpoint itself.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_tempnet.cli import run_command  # noqa: E402
from megatron_tempnet.hf.convert import checkpoint_to_hf  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint save dir or one iter_* dir")
    p.add_argument("--output", required=True, help="new (or empty) directory to write")
    p.add_argument("--tokenizer-model", help="SentencePiece .model or tokenizers .json to copy")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = p.parse_args(argv)
    out = checkpoint_to_hf(args.load, args.output, args.tokenizer_model, DTYPES[args.dtype])
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    """_main; a bad input ends as one line ``error: ...`` and exit code 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
