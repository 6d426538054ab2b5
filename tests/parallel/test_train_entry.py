"""The entry point end to end: corpus -> tokenizer -> .bin/.idx -> torchrun training at TP=2."""
import re
import subprocess
import sys

import pytest

from megatron_tempnet.data.demo_corpus import write_demo_corpus
from torchrun import REPO, free_port

pytestmark = pytest.mark.parallel


def run(cmd, timeout=300):
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-4000:]}\n{out.stderr[-8000:]}"
    return out.stdout


def test_train_tiny_llama_tp2_lowers_loss(tmp_path):
    corpus, spm, prefix = tmp_path / "c.jsonl", tmp_path / "tok.model", tmp_path / "demo"
    write_demo_corpus(str(corpus), max_bytes=400_000)
    py = sys.executable
    run([py, "tools/train_tokenizer.py", "--input", str(corpus), "--output", str(spm),
         "--type", "sentencepiece-bpe", "--vocab-size", "500"])
    run([py, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix", str(prefix),
         "--tokenizer-type", "sentencepiece", "--tokenizer-model", str(spm), "--append-eod"])
    out = run([py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "megatron_tempnet.train", "--model", "tiny-llama",
               "--tensor-model-parallel-size", "2", "--data-path", f"{prefix}_text_document",
               "--tokenizer-model", str(spm), "--split", "99,1,0", "--seq-length", "64",
               "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "30",
               "--lr", "5e-3", "--log-interval", "5"])
    losses = [float(x) for x in re.findall(r"lm loss ([0-9.]+)", out)]
    assert len(losses) == 6, out
    assert "tokens/s" in out
    assert losses[-1] < losses[0] - 0.5, losses


def test_train_tiny_gpt_pp2_with_tempnet_lowers_loss(tiny_corpus):
    """PP=2 (tied embeddings across the two stages) with TempNet and the DRO loss."""
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "-m", "megatron_tempnet.train",
               "--model", "tiny-gpt", "--pipeline-model-parallel-size", "2",
               *tiny_corpus.data_flags(), "--seq-length", "64", "--micro-batch-size", "2",
               "--global-batch-size", "8", "--train-iters", "30", "--lr", "5e-3",
               "--log-interval", "5", "--eval-iters", "0", "--tempnet-loss-mode", "tempnet_dro",
               "--tempnet-rho", "4.0",
               "--tempnet-hidden-size", "32", "--tempnet-lr", "1e-3"])
    losses = [float(x) for x in re.findall(r"dro loss ([0-9.]+)", out)]
    taus = [float(x) for x in re.findall(r"\| tau ([0-9.]+)", out)]
    assert len(losses) == 6 and len(taus) == 6, out
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(0.5 <= t <= 5.0 for t in taus), taus
