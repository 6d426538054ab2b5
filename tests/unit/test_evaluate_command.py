"""``python -m megatron_tempnet.evaluate``: flag handling, and one end-to-end run on a tiny
corpus (single process, model as initialised: loading is training/checkpointing.py's, tested
there; the command's one call site is ``load_model_weights``)."""
import json
import os
import subprocess
import sys

from megatron_tempnet.evaluate import parse
from torchrun import REPO, free_port


def test_flags_split_between_training_and_evaluation():
    run, eval_cfg, split, jsonl = parse(
        ["--model", "tiny-llama", "--split", "90,10,0", "--eval-split", "test", "--eval-iters",
         "3", "--temperature-points", "9", "--temperature-max", "8", "--tempnet-loss-mode",
         "tempnet_dro", "--metrics-jsonl", "m.jsonl"])
    assert run.data.split == "90,10,0" and run.tempnet.loss_mode == "tempnet_dro"
    assert (eval_cfg.eval_iters, eval_cfg.temperature_points, eval_cfg.temperature_max) == \
        (3, 9, 8.0)
    assert split == "test" and jsonl == "m.jsonl"
    _, eval_cfg, split, jsonl = parse(["--model", "tiny-llama"])
    assert split == "valid" and jsonl is None and eval_cfg.eval_iters == 10


def test_command_prints_the_table(tmp_path):
    from megatron_tempnet.data.demo_corpus import write_demo_corpus
    from megatron_tempnet.data.preprocess import PreprocessConfig, preprocess
    from megatron_tempnet.data.tokenizer_training import (TokenizerTrainingConfig,
                                                          train_tokenizer)
    from megatron_tempnet.data.tokenizers import TokenizerConfig

    corpus, spm, prefix = tmp_path / "c.jsonl", tmp_path / "tok.model", tmp_path / "d"
    write_demo_corpus(str(corpus), max_bytes=120_000)
    train_tokenizer(TokenizerTrainingConfig(inputs=[str(corpus)], output=str(spm),
                                            vocab_size=500))
    preprocess(PreprocessConfig(inputs=[str(corpus)], output_prefix=str(prefix),
                                tokenizer=TokenizerConfig("sentencepiece", str(spm)),
                                append_eod=True))
    jsonl = tmp_path / "eval.jsonl"
    cmd = [sys.executable, "-m", "megatron_tempnet.evaluate", "--model", "tiny-llama",
           "--data-path", f"{prefix}_text_document", "--tokenizer-model", str(spm),
           "--split", "80,20,0", "--seq-length", "32", "--micro-batch-size", "2",
           "--global-batch-size", "4", "--eval-iters", "2", "--tempnet-loss-mode",
           "dro_fixed_tau", "--tempnet-fixed-tau", "0.8", "--metrics-jsonl", str(jsonl)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))  # a single-process launch
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-6000:]
    assert "no --load given" in out.stdout
    for row in ("tau = 1", "fixed tau = 0.8", "best global T =", "ppl", "ECE"):
        assert row in out.stdout, out.stdout
    record = json.loads(jsonl.read_text().splitlines()[-1])
    assert record["split"] == "valid" and record["eval tokens"] == 2 * 4 * 32
    assert record["ppl best T"] <= record["ppl tau=1"] and record["fixed tau"] == 0.8
