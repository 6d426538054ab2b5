"""Merge several Megatron .bin/.idx datasets into one, in the order given.

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \
        --output-prefix data/ab_text_document
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tempnet.data.cli import run_tool  # noqa: E402
from megatron_tempnet.data.indexed import merge_datasets  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes (no .bin/.idx)")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    info = merge_datasets(args.input, args.output_prefix)
    print(f"merged {len(args.input)} datasets into {args.output_prefix}.bin/.idx: "
          f"{info.num_documents} documents, {info.num_sequences} sequences, "
          f"{info.bin_bytes // info.dtype.itemsize} tokens ({info.dtype.name})")


if __name__ == "__main__":
    run_tool(main)
