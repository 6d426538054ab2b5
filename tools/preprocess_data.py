"""Tokenize JSONL documents into Megatron .bin/.idx datasets (one pair per --json-keys key).

    python tools/preprocess_data.py --input data/*.jsonl.gz --output-prefix data/corpus \
        --tokenizer-type sentencepiece --tokenizer-model tok.model --append-eod --workers 8

writes data/corpus_text_document.bin/.idx, readable by megatron-core's IndexedDataset.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tempnet.data.cli import run_tool  # noqa: E402
from megatron_tempnet.data.preprocess import (ON_ERROR_CHOICES, PreprocessConfig,  # noqa: E402
                                              preprocess)
from megatron_tempnet.data.tokenizers import TOKENIZER_TYPES, TokenizerConfig  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help=".jsonl/.jsonl.gz files, directories or globs")
    p.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--tokenizer-type", required=True, choices=sorted(TOKENIZER_TYPES))
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model, or tokenizers JSON file (or its directory)")
    p.add_argument("--eod-token", default=None,
                   help="end-of-document token (default: the model's eos / <|endoftext|>)")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--append-eod", action="store_true",
                   help="append the eod token to every non-empty document")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="fail",
                   help="bad input lines: stop (fail) or drop and report them (skip)")
    p.add_argument("--log-interval", type=int, default=10000,
                   help="documents between progress lines")
    p.add_argument("--chunk-mb", type=float, default=1.0, help="input MB per unit of work")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = get_args(argv)
    summary = preprocess(PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix,
        tokenizer=TokenizerConfig(args.tokenizer_type, args.tokenizer_model, args.eod_token),
        json_keys=args.json_keys, append_eod=args.append_eod, workers=args.workers,
        on_error=args.on_error, log_interval=args.log_interval,
        chunk_bytes=int(args.chunk_mb * (1 << 20))))
    print(summary.format())


if __name__ == "__main__":
    run_tool(main)
