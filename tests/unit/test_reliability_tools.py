"""The tools end a bad input with one line ``error: ...`` and exit code 2 (no traceback), and
write nothing on the way out; a single process picks a free rendezvous port."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from megatron_tempnet.parallel import detect_launch_env
from reliability import assert_one_error
from torchrun import REPO

LLAMA = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2}


def run_tool(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"tools/{script}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def snapshot(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


def hf_dir(path, config: dict | None = None, tokenizer: bool = False):
    """A directory with only config.json (no weights: a check that reads weights fails) and
    optionally a tiny word-level tokenizer.json in which whitespace encodes to nothing."""
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "hello": 2}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(path / "tokenizer.json"))
    return path


# tools/generate.py

def test_generate_missing_model_dir(tmp_path):
    out = run_tool("generate.py", "--model-dir", tmp_path / "nope", "--prompt", "hello")
    assert_one_error(out, "--model-dir", str(tmp_path / "nope"), "no such directory",
                     "convert_checkpoint_to_hf")


def test_generate_model_dir_without_config(tmp_path):
    out = run_tool("generate.py", "--model-dir", hf_dir(tmp_path / "m"), "--prompt", "hello")
    assert_one_error(out, "--model-dir", "no config.json")


def test_generate_model_dir_without_tokenizer(tmp_path):
    out = run_tool("generate.py", "--model-dir", hf_dir(tmp_path / "m", LLAMA), "--prompt", "hi")
    assert_one_error(out, "tokenizer.json", "--tokenizer")


@pytest.mark.parametrize("prompt,words", [("", ["--prompt is empty"]),
                                          ("   ", ["--prompt '   '", "zero tokens"])])
def test_generate_prompt_without_tokens(tmp_path, prompt, words):
    model_dir = hf_dir(tmp_path / "m", LLAMA, tokenizer=True)
    assert_one_error(run_tool("generate.py", "--model-dir", model_dir, "--prompt", prompt), *words)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_generate_max_new_tokens_below_one(tmp_path, value):
    out = run_tool("generate.py", "--model-dir", hf_dir(tmp_path / "m", LLAMA, tokenizer=True),
                   "--prompt", "hello", "--max-new-tokens", value)
    assert_one_error(out, f"--max-new-tokens {value}", ">= 1")


def test_generate_tempnet_mode_on_plain_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "m"
    LlamaForCausalLM(LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=16)).save_pretrained(model_dir)
    hf_dir(model_dir, tokenizer=True)
    out = run_tool("generate.py", "--model-dir", model_dir, "--prompt", "hello",
                   "--temperature-mode", "tempnet")
    assert_one_error(out, "--temperature-mode tempnet", "no per-token tau", "fixed or anneal")


# tools/convert_hf_to_checkpoint.py

@pytest.mark.parametrize("config,words", [
    (None, ["--input", "no config.json"]),
    ({"model_type": "bert"}, ["model_type 'bert' is not supported", "gpt2, llama"]),
    ({**LLAMA}, ["--target-tensor-parallel-size 3", "4 attention heads", "2 query groups",
                 "[1, 2]"]),
])
def test_hf_to_checkpoint_bad_input_writes_nothing(tmp_path, config, words):
    save = tmp_path / "ckpt"
    out = run_tool("convert_hf_to_checkpoint.py", "--input", hf_dir(tmp_path / "hf", config),
                   "--save", save, "--target-tensor-parallel-size", "3")
    assert_one_error(out, *words)
    assert not save.exists()


def test_hf_to_checkpoint_missing_input(tmp_path):
    out = run_tool("convert_hf_to_checkpoint.py", "--input", tmp_path / "nope",
                   "--save", tmp_path / "ckpt")
    assert_one_error(out, "--input", str(tmp_path / "nope"), "no such directory")
    assert not (tmp_path / "ckpt").exists()


def test_hf_to_checkpoint_tp_must_divide_gpt2_heads(tmp_path):
    out = run_tool("convert_hf_to_checkpoint.py", "--input",
                   hf_dir(tmp_path / "hf", {"model_type": "gpt2", "n_head": 6}),
                   "--save", tmp_path / "ckpt", "--target-tensor-parallel-size", "4")
    assert_one_error(out, "6 attention heads", "[1, 2, 3, 6]")


@pytest.mark.parametrize("existing", ["latest_checkpointed_iteration.txt", "iter_0000005/x"])
def test_hf_to_checkpoint_refuses_existing_checkpoint(tmp_path, existing):
    save = tmp_path / "ckpt"
    (save / existing).parent.mkdir(parents=True, exist_ok=True)
    (save / existing).write_text("5\n")
    before = snapshot(save)
    out = run_tool("convert_hf_to_checkpoint.py", "--input", hf_dir(tmp_path / "hf", LLAMA),
                   "--save", save)
    assert_one_error(out, f"--save {save}", "already holds a checkpoint", "another --save")
    assert snapshot(save) == before and (save / existing).read_text() == "5\n"


TEMPNET_EXPORT = {"model_type": "tempnet_llama", "num_attention_heads": 8,
                  "num_key_value_heads": 8, "vocab_size": 500, "padded_vocab_size": 620,
                  "tempnet": {"loss_mode": "tempnet_dro", "hidden_size": 16}}


@pytest.mark.parametrize("args,words", [
    (["--target-tensor-parallel-size", "8"], ["--target-tensor-parallel-size 8",
                                              "620 padded vocabulary rows", "divides 620"]),
    (["--make-vocab-size-divisible-by", "128"], ["--make-vocab-size-divisible-by 128",
                                                 "620 rows TempNet was trained on",
                                                 "drop the flag"]),
])
def test_hf_to_checkpoint_keeps_a_tempnet_exports_padding(tmp_path, args, words):
    out = run_tool("convert_hf_to_checkpoint.py", "--input",
                   hf_dir(tmp_path / "hf", TEMPNET_EXPORT), "--save", tmp_path / "ckpt", *args)
    assert_one_error(out, *words)
    assert not (tmp_path / "ckpt").exists()


def test_hf_to_checkpoint_runs_inside_another_jobs_environment(tmp_path):
    """A surrounding torchrun / SLURM step's RANK, WORLD_SIZE and (busy) MASTER_PORT are not
    the converter's: it runs as one process on a free port, and says what it wrote."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=32)
                     ).save_pretrained(tmp_path / "hf")
    with listening_socket() as busy:
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(busy.getsockname()[1])}
        out = subprocess.run([sys.executable, "tools/convert_hf_to_checkpoint.py", "--input",
                              tmp_path / "hf", "--save", tmp_path / "ckpt"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (f"wrote {tmp_path / 'ckpt' / 'iter_0000000'}: llama 1 layers, hidden 32, "
            "vocabulary 100 padded to 128 (for TP=1), float32") in out.stdout, out.stdout
    assert "no TempNet (plain model)" in out.stdout and "--finetune" in out.stdout


# tools/convert_deepspeed_checkpoint.py

def test_deepspeed_converter_refuses_a_megatron_core_checkpoint(tmp_path):
    (tmp_path / "mc" / "iter_0000002").mkdir(parents=True)
    (tmp_path / "mc" / "iter_0000002" / "metadata.json").write_text("{}")
    (tmp_path / "mc" / "latest_checkpointed_iteration.txt").write_text("2\n")
    out = run_tool("convert_deepspeed_checkpoint.py", "--load", tmp_path / "mc",
                   "--save", tmp_path / "out")
    assert_one_error(out, "megatron-core dist_checkpointing checkpoint, not a DeepSpeed")
    assert not (tmp_path / "out").exists()


# tools/convert_checkpoint_to_hf.py

def test_checkpoint_to_hf_missing_load(tmp_path):
    out = run_tool("convert_checkpoint_to_hf.py", "--load", tmp_path / "nope",
                   "--output", tmp_path / "hf")
    assert_one_error(out, "--load", str(tmp_path / "nope"), "no such directory")
    assert not (tmp_path / "hf").exists()


def test_checkpoint_to_hf_load_without_checkpoint(tmp_path):
    (tmp_path / "run" / "notes.txt").parent.mkdir()
    (tmp_path / "run" / "notes.txt").write_text("x")
    out = run_tool("convert_checkpoint_to_hf.py", "--load", tmp_path / "run",
                   "--output", tmp_path / "hf")
    assert_one_error(out, "--load", "latest_checkpointed_iteration.txt", "notes.txt")
    assert not (tmp_path / "hf").exists()


def test_checkpoint_to_hf_refuses_non_empty_output(tmp_path):
    output = tmp_path / "hf"
    output.mkdir()
    (output / "config.json").write_text("{}")
    out = run_tool("convert_checkpoint_to_hf.py", "--load", tmp_path / "run", "--output", output)
    assert_one_error(out, f"--output {output}", "refusing to overwrite", "another --output")
    assert snapshot(output) == ["config.json"] and (output / "config.json").read_text() == "{}"


def test_checkpoint_to_hf_missing_tokenizer_model(tmp_path):
    out = run_tool("convert_checkpoint_to_hf.py", "--load", tmp_path / "run",
                   "--output", tmp_path / "hf", "--tokenizer-model", tmp_path / "sp.model")
    assert_one_error(out, "--tokenizer-model", "no such file")


# detect_launch_env's port

def listening_socket() -> socket.socket:
    """A socket listening on 29500 if that is free, else on any port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 29500))
    except OSError:
        s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_single_process_picks_a_free_port():
    with listening_socket() as busy:
        taken = busy.getsockname()[1]
        env = detect_launch_env({})
        assert env.launcher == "single" and env.master_port != taken
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((env.master_addr, env.master_port))  # free: binding succeeds


def test_master_port_is_honoured():
    assert detect_launch_env({"MASTER_PORT": "31234"}).master_port == 31234
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    assert detect_launch_env(torchrun).master_port == 29500  # every rank must agree
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "n1"}
    assert detect_launch_env(slurm).master_port == 29500
