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
         "tempnet_dro", "--metrics-jsonl", "m.jsonl", "--ensemble-temperatures", "0.5", "3",
         "--confidence-threshold", "0.4", "--entropy-temperature-alpha", "0.5"])
    assert run.data.split == "90,10,0" and run.tempnet.loss_mode == "tempnet_dro"
    assert (eval_cfg.eval_iters, eval_cfg.temperature_points, eval_cfg.temperature_max) == \
        (3, 9, 8.0)
    assert (eval_cfg.ensemble_temperatures, eval_cfg.confidence_threshold,
            eval_cfg.entropy_temperature_alpha) == ([0.5, 3.0], 0.4, 0.5)
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
           "dro_fixed_tau", "--tempnet-fixed-tau", "0.8", "--metrics-jsonl", str(jsonl),
           "--ensemble-temperatures", "0.5", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))  # a single-process launch
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-6000:]
    assert "no --load given" in out.stdout
    for row in ("tau = 1", "fixed tau = 0.8", "best global T =", "ppl", "ECE",
                "entropy-adaptive T (base 1, a 1; mean", "ensemble T in {0.5, 2}",
                "confidence threshold 0.5 (T 0.8 / 1.5;"):
        assert row in out.stdout, out.stdout
    record = json.loads(jsonl.read_text().splitlines()[-1])
    assert record["split"] == "valid" and record["eval tokens"] == 2 * 4 * 32
    assert record["ppl best T"] <= record["ppl tau=1"] and record["fixed tau"] == 0.8
    assert record["temperature tools"]["ensemble_temperatures"] == [0.5, 2.0]
    assert record["ppl ensemble"] > 1 and 0 <= record["threshold confident fraction"] <= 1


def test_load_brings_the_model_and_tempnet_settings(monkeypatch, tmp_path):
    """--load CKPT alone gives the checkpoint's model and TempNet settings; a given flag
    stays (the load's checks then refuse it if it changes the model); --model keeps its
    preset's architecture."""
    import dataclasses

    from megatron_tempnet.config import load_model_preset
    from megatron_tempnet.tempnet.config import TempNetConfig
    from megatron_tempnet.training import checkpoint_layout, run_record

    record = {"model": dataclasses.asdict(load_model_preset("tiny-gpt", vocab_size=500)),
              "tempnet": dataclasses.asdict(TempNetConfig(loss_mode="tempnet_dro", rho=2.0,
                                                          hidden_size=16)),
              "parallel": {"tp": 1, "pp": 1, "dp": 1}}
    monkeypatch.setattr(checkpoint_layout, "resolve_load_dir",
                        lambda load, save, fmt="torch_dist": tmp_path)
    monkeypatch.setattr(run_record, "read_run_record", lambda path, fmt: record)
    run, *_ = parse(["--load", str(tmp_path), "--tempnet-rho", "3"])
    assert (run.model.family, run.model.num_layers, run.model.hidden_size) == (
        "gpt", record["model"]["num_layers"], record["model"]["hidden_size"])
    assert (run.tempnet.loss_mode, run.tempnet.hidden_size, run.tempnet.rho) == (
        "tempnet_dro", 16, 3.0)
    run, *_ = parse(["--load", str(tmp_path), "--model", "tiny-llama"])
    assert run.model.family == "llama" and run.tempnet.loss_mode == "tempnet_dro"
    run, *_ = parse(["--model", "tiny-llama"])  # no --load: nothing read
    assert run.tempnet.loss_mode == TempNetConfig().loss_mode
