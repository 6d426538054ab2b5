#!/usr/bin/env python3
"""DeepSpeed checkpoint -> megatron-core (torch_dist) checkpoint of its model weights.

    python tools/convert_deepspeed_checkpoint.py --load checkpoints/ds_run --save checkpoints/ds_run_mc
    torchrun ... -m megatron_tempnet.train --load checkpoints/ds_run_mc --finetune ...   # any TP/PP
    python -m megatron_tempnet.evaluate --load checkpoints/ds_run_mc ...                 # any TP/PP

DeepSpeed checkpoints load at the tensor-parallel size they were saved with; the converted one
at any TP/PP (dist_checkpointing reshards). It keeps the iteration, consumed samples and run
record; it holds no optimizer or RNG state (continue the run with --no-load-optim
--no-load-rng). One process per saved tensor-parallel rank, on the CPU (gloo), on a free port.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tempnet.cli import run_command  # noqa: E402


def _main(argv=None) -> int:
    from megatron_tempnet.hf.convert import describe_checkpoint
    from megatron_tempnet.training.convert_deepspeed import deepspeed_to_torch_dist

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="DeepSpeed checkpoint: save dir or iter_* dir")
    p.add_argument("--save", required=True, help="new directory (holding no checkpoint yet)")
    args = p.parse_args(argv)
    print(describe_checkpoint(deepspeed_to_torch_dist(args.load, args.save)))
    return 0


def main(argv=None) -> int:
    """_main; a bad input ends as one line ``error: ...`` and exit code 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
