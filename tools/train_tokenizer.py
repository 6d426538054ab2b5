"""Train a tokenizer from JSONL (--json-key) or plain-text files; no downloads.

    python tools/train_tokenizer.py --input demo.jsonl --type sentencepiece-bpe \
        --vocab-size 8000 --output tok.model
    python tools/train_tokenizer.py --input demo.jsonl --type byte-level-bpe \
        --vocab-size 8000 --output tokenizer.json

Then preprocess with --tokenizer-type sentencepiece / huggingface and --tokenizer-model <output>.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tempnet.data.cli import run_tool  # noqa: E402
from megatron_tempnet.data.tokenizer_training import (TRAINING_TYPES,  # noqa: E402
                                                      TokenizerTrainingConfig, train_tokenizer)
from megatron_tempnet.data.tokenizers import load_tokenizer  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help=".jsonl[.gz] or .txt[.gz] files, directories or globs")
    p.add_argument("--output", required=True,
                   help=".model file (sentencepiece-*) or .json file (byte-level-bpe)")
    p.add_argument("--type", choices=TRAINING_TYPES, default="sentencepiece-bpe")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--json-key", default="text")
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                   help="SentencePiece: map unknown characters to <unk> instead of bytes")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    path = train_tokenizer(TokenizerTrainingConfig(
        inputs=args.input, output=args.output, type=args.type, vocab_size=args.vocab_size,
        json_key=args.json_key, byte_fallback=args.byte_fallback,
        max_documents=args.max_documents, num_threads=args.threads))
    kind = "huggingface" if args.type == "byte-level-bpe" else "sentencepiece"
    tok = load_tokenizer(kind, path)
    print(f"wrote {path}: {kind} tokenizer, vocab size {tok.vocab_size}, eod {tok.eod}, "
          f"bos {tok.bos}, pad {tok.pad_id} (use --tokenizer-type {kind})")


if __name__ == "__main__":
    run_tool(main)
