"""``make demo``: the main job end to end on a CPU, with nothing downloaded.

    demo corpus (stdlib docstrings) -> SentencePiece tokenizer -> .bin/.idx
    -> tiny LLaMA + TempNet (DRO loss) trained at TP=2 under torchrun (2 processes, gloo),
       printing loss, tau statistics and tokens/s, with checkpoints, evaluation, TensorBoard
    -> the checkpoint evaluated at TP=1 (perplexity and ECE at tau=1, TempNet tau, best T)
    -> exported to Hugging Face (demo_out/hf_iter_<N>) -> text generated with TempNet's
       per-token temperature

Each step is the real command a user runs (printed before it runs); outputs go to demo_out/.
Steps whose outputs exist are skipped; training resumes from its latest checkpoint.
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
    # docs/tempnet_math.md 5: rho = log V - 2.83 as in the paper's GPT-2 run (V padded: 2048)
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
    ckpt = out / "checkpoints"
    model_flags = ["--model", "tiny-llama", "--data-path", str(data), "--tokenizer-type",
                   "SentencePieceTokenizer", "--tokenizer-model", str(spm), "--split", "98,2,0",
                   "--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", "16",
                   "--tempnet-loss-mode", "tempnet_dro", "--tempnet-rho", str(args.rho)]
    run([py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
         "megatron_tempnet.train", *model_flags, "--tensor-model-parallel-size", "2",
         "--train-iters", str(args.train_iters), "--lr", "3e-3", "--min-lr", "3e-4",
         "--lr-warmup-iters", "4", "--log-interval", "5", "--tempnet-lr", "1e-3",
         "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "20",
         "--eval-interval", "20", "--eval-iters", "2", "--tensorboard-dir",
         str(out / "tensorboard"), "--metrics-jsonl", str(out / "metrics.jsonl")])
    # the checkpoint saved at TP=2 evaluated by one process (TP=1): dist_checkpointing reshards
    run([py, "-m", "megatron_tempnet.evaluate", *model_flags, "--load", str(ckpt),
         "--eval-iters", "4"])
    # one export per checkpoint (the export tool never writes into a non-empty directory)
    hf = out / f"hf_iter_{(ckpt / 'latest_checkpointed_iteration.txt').read_text().strip()}"
    if not hf.exists():
        run([py, "tools/convert_checkpoint_to_hf.py", "--load", str(ckpt), "--output", str(hf),
             "--tokenizer-model", str(spm)])
    run([py, "tools/generate.py", "--model-dir", str(hf), "--prompt",
         "Return the number of", "--max-new-tokens", "16", "--show-tau"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
