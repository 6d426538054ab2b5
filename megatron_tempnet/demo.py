"""``make demo``: the main job end to end on a CPU, with nothing downloaded.

    demo corpus (stdlib docstrings) -> SentencePiece tokenizer -> .bin/.idx
    -> tiny LLaMA + TempNet (DRO loss) trained at TP=2 under torchrun (2 processes, gloo),
       printing loss, tau statistics and tokens/s

Each step is the real command a user runs (printed before it runs); outputs go to demo_out/.
Steps whose outputs exist are skipped, so a second ``make demo`` goes straight to training.
"""
from __future__ import annotations

import argparse
import math
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "demo_out"))
    parser.add_argument("--train-iters", type=int, default=40)
    parser.add_argument("--vocab-size", type=int, default=2000)
    # tempnet.md section 5: rho = log V - 2.83 as in the paper's GPT-2 run (V padded: 2048)
    parser.add_argument("--rho", type=float, default=round(math.log(2048) - 2.83, 3))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    corpus, spm = out / "corpus.jsonl", out / "tokenizer.model"
    prefix = out / "demo"
    data = Path(f"{prefix}_text_document")

    if not corpus.exists():
        run([py, "-m", "megatron_tempnet.data.demo_corpus", "--output", str(corpus)])
    if not spm.exists():
        run([py, "tools/train_tokenizer.py", "--input", str(corpus), "--output", str(spm),
             "--type", "sentencepiece-bpe", "--vocab-size", str(args.vocab_size)])
    if not Path(f"{data}.idx").exists():
        run([py, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix",
             str(prefix), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
             str(spm), "--append-eod", "--workers", "2"])
    run([py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
         "megatron_tempnet.train", "--model", "tiny-llama",
         "--tensor-model-parallel-size", "2", "--data-path", str(data),
         "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(spm),
         "--split", "98,2,0", "--seq-length", "128", "--micro-batch-size", "4",
         "--global-batch-size", "16", "--train-iters", str(args.train_iters), "--lr", "3e-3",
         "--min-lr", "3e-4", "--lr-warmup-iters", "4", "--log-interval", "5",
         "--tempnet-loss-mode", "tempnet_dro", "--tempnet-rho", str(args.rho),
         "--tempnet-lr", "1e-3"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
