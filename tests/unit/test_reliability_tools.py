"""The tools end a bad input with one line ``error: ...`` and exit code 2 (no traceback), and
write nothing on the way out; a single process picks a free rendezvous port.

Each tool run is a fresh Python process, mostly imports on one core: the module's runs start
together, two at a time (fixture ``runs``; CI has 2 cores). A run is declared by the function
that makes its inputs in a directory of its own and returns the tool's command line
(``@tool_run``); its test waits for it and checks the result."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_tempnet.parallel import detect_launch_env
from reliability import assert_one_error
from torchrun import REPO

LLAMA = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2}
RUNS = {}  # key -> make(d): the tool's arguments (tools/<script> first), inputs made under d


def tool_run(key: str, **kw):
    """Declare a run, keyed by its test's name (``[index]`` added for a parametrized one):
    ``make(d, **kw)`` makes its inputs under ``d`` and returns its arguments, or (arguments, a
    context manager giving its environment) for a run that needs its own."""
    def register(make):
        RUNS[key] = lambda d: make(d, **kw)
        return make
    return register


def run_tool(script: str, *args, env=None) -> subprocess.CompletedProcess:
    """``env``: None (this process's), or a context manager giving the run's environment."""
    with env if env is not None else contextlib.nullcontext() as run_env:
        return subprocess.run([sys.executable, f"tools/{script}", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=300, env=run_env)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """{key: (its directory, future of its CompletedProcess)}: the run of every selected test of
    this module is started here, in declaration order, as soon as its inputs exist."""
    tests = {name for name in dir(request.module) if name.startswith("test_")}
    assert {key.split("[")[0] for key in RUNS} <= tests, "a run declared for no test"
    selected = {item.originalname for item in request.session.items
                if getattr(item, "module", None) is request.module}
    base = tmp_path_factory.mktemp("tools")
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = {}
        for key, make in RUNS.items():
            if key.split("[")[0] not in selected:
                continue
            d = base / re.sub(r"\W", "_", key)
            d.mkdir()
            spec = make(d)
            args, env = spec if isinstance(spec, tuple) else (spec, None)
            started[key] = (d, pool.submit(run_tool, *args, env=env))
        yield started


def result(runs, key: str) -> tuple[Path, subprocess.CompletedProcess]:
    d, future = runs[key]
    return d, future.result()


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

@tool_run("test_generate_missing_model_dir")
def make_generate_missing_model_dir(d):
    return ["generate.py", "--model-dir", d / "nope", "--prompt", "hello"]


def test_generate_missing_model_dir(runs):
    d, out = result(runs, "test_generate_missing_model_dir")
    assert_one_error(out, "--model-dir", str(d / "nope"), "no such directory",
                     "convert_checkpoint_to_hf")


@tool_run("test_generate_model_dir_without_config")
def make_generate_model_dir_without_config(d):
    return ["generate.py", "--model-dir", hf_dir(d / "m"), "--prompt", "hello"]


def test_generate_model_dir_without_config(runs):
    _, out = result(runs, "test_generate_model_dir_without_config")
    assert_one_error(out, "--model-dir", "no config.json")


@tool_run("test_generate_model_dir_without_tokenizer")
def make_generate_model_dir_without_tokenizer(d):
    return ["generate.py", "--model-dir", hf_dir(d / "m", LLAMA), "--prompt", "hi"]


def test_generate_model_dir_without_tokenizer(runs):
    _, out = result(runs, "test_generate_model_dir_without_tokenizer")
    assert_one_error(out, "tokenizer.json", "--tokenizer")


PROMPTS = [("", ["--prompt is empty"]), ("   ", ["--prompt '   '", "zero tokens"])]
for _i, (_prompt, _) in enumerate(PROMPTS):
    @tool_run(f"test_generate_prompt_without_tokens[{_i}]", prompt=_prompt)
    def make_generate_prompt_without_tokens(d, prompt):
        return ["generate.py", "--model-dir", hf_dir(d / "m", LLAMA, tokenizer=True),
                "--prompt", prompt]


@pytest.mark.parametrize("i,prompt,words", [(i, *case) for i, case in enumerate(PROMPTS)])
def test_generate_prompt_without_tokens(runs, i, prompt, words):
    _, out = result(runs, f"test_generate_prompt_without_tokens[{i}]")
    assert out.args[out.args.index("--prompt") + 1] == prompt
    assert_one_error(out, *words)


MAX_NEW_TOKENS = ["0", "-3"]
for _value in MAX_NEW_TOKENS:
    @tool_run(f"test_generate_max_new_tokens_below_one[{_value}]", value=_value)
    def make_generate_max_new_tokens(d, value):
        return ["generate.py", "--model-dir", hf_dir(d / "m", LLAMA, tokenizer=True),
                "--prompt", "hello", "--max-new-tokens", value]


@pytest.mark.parametrize("value", MAX_NEW_TOKENS)
def test_generate_max_new_tokens_below_one(runs, value):
    _, out = result(runs, f"test_generate_max_new_tokens_below_one[{value}]")
    assert_one_error(out, f"--max-new-tokens {value}", ">= 1")


@tool_run("test_generate_tempnet_mode_on_plain_model")
def make_generate_tempnet_mode_on_plain_model(d):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = d / "m"
    LlamaForCausalLM(LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=16)).save_pretrained(model_dir)
    hf_dir(model_dir, tokenizer=True)
    return ["generate.py", "--model-dir", model_dir, "--prompt", "hello",
            "--temperature-mode", "tempnet"]


def test_generate_tempnet_mode_on_plain_model(runs):
    _, out = result(runs, "test_generate_tempnet_mode_on_plain_model")
    assert_one_error(out, "--temperature-mode tempnet", "no per-token tau", "fixed or anneal")


# tools/convert_hf_to_checkpoint.py

HF_BAD_INPUT = [
    (None, ["--input", "no config.json"]),
    ({"model_type": "bert"}, ["model_type 'bert' is not supported", "gpt2, llama"]),
    ({**LLAMA}, ["--target-tensor-parallel-size 3", "4 attention heads", "2 query groups",
                 "[1, 2]"]),
]
for _i, (_config, _) in enumerate(HF_BAD_INPUT):
    @tool_run(f"test_hf_to_checkpoint_bad_input_writes_nothing[{_i}]", config=_config)
    def make_hf_to_checkpoint_bad_input(d, config):
        return ["convert_hf_to_checkpoint.py", "--input", hf_dir(d / "hf", config),
                "--save", d / "ckpt", "--target-tensor-parallel-size", "3"]


@pytest.mark.parametrize("i,words", [(i, words) for i, (_, words) in enumerate(HF_BAD_INPUT)])
def test_hf_to_checkpoint_bad_input_writes_nothing(runs, i, words):
    d, out = result(runs, f"test_hf_to_checkpoint_bad_input_writes_nothing[{i}]")
    assert_one_error(out, *words)
    assert not (d / "ckpt").exists()


@tool_run("test_hf_to_checkpoint_missing_input")
def make_hf_to_checkpoint_missing_input(d):
    return ["convert_hf_to_checkpoint.py", "--input", d / "nope", "--save", d / "ckpt"]


def test_hf_to_checkpoint_missing_input(runs):
    d, out = result(runs, "test_hf_to_checkpoint_missing_input")
    assert_one_error(out, "--input", str(d / "nope"), "no such directory")
    assert not (d / "ckpt").exists()


@tool_run("test_hf_to_checkpoint_tp_must_divide_gpt2_heads")
def make_hf_to_checkpoint_tp_must_divide_gpt2_heads(d):
    return ["convert_hf_to_checkpoint.py", "--input",
            hf_dir(d / "hf", {"model_type": "gpt2", "n_head": 6}),
            "--save", d / "ckpt", "--target-tensor-parallel-size", "4"]


def test_hf_to_checkpoint_tp_must_divide_gpt2_heads(runs):
    _, out = result(runs, "test_hf_to_checkpoint_tp_must_divide_gpt2_heads")
    assert_one_error(out, "6 attention heads", "[1, 2, 3, 6]")


EXISTING = ["latest_checkpointed_iteration.txt", "iter_0000005/x"]
for _i, _existing in enumerate(EXISTING):
    @tool_run(f"test_hf_to_checkpoint_refuses_existing_checkpoint[{_i}]", existing=_existing)
    def make_hf_to_checkpoint_refuses_existing_checkpoint(d, existing):
        save = d / "ckpt"
        (save / existing).parent.mkdir(parents=True, exist_ok=True)
        (save / existing).write_text("5\n")
        (d / "before.json").write_text(json.dumps(snapshot(save)))
        return ["convert_hf_to_checkpoint.py", "--input", hf_dir(d / "hf", LLAMA),
                "--save", save]


@pytest.mark.parametrize("i,existing", list(enumerate(EXISTING)))
def test_hf_to_checkpoint_refuses_existing_checkpoint(runs, i, existing):
    d, out = result(runs, f"test_hf_to_checkpoint_refuses_existing_checkpoint[{i}]")
    save = d / "ckpt"
    before = json.loads((d / "before.json").read_text())
    assert_one_error(out, f"--save {save}", "already holds a checkpoint", "another --save")
    assert snapshot(save) == before and (save / existing).read_text() == "5\n"


TEMPNET_EXPORT = {"model_type": "tempnet_llama", "num_attention_heads": 8,
                  "num_key_value_heads": 8, "vocab_size": 500, "padded_vocab_size": 620,
                  "tempnet": {"loss_mode": "tempnet_dro", "hidden_size": 16}}
TEMPNET_PADDING = [
    (["--target-tensor-parallel-size", "8"], ["--target-tensor-parallel-size 8",
                                              "620 padded vocabulary rows", "divides 620"]),
    (["--make-vocab-size-divisible-by", "128"], ["--make-vocab-size-divisible-by 128",
                                                 "620 rows TempNet was trained on",
                                                 "drop the flag"]),
]
for _i, (_args, _) in enumerate(TEMPNET_PADDING):
    @tool_run(f"test_hf_to_checkpoint_keeps_a_tempnet_exports_padding[{_i}]", args=_args)
    def make_hf_to_checkpoint_keeps_a_tempnet_exports_padding(d, args):
        return ["convert_hf_to_checkpoint.py", "--input", hf_dir(d / "hf", TEMPNET_EXPORT),
                "--save", d / "ckpt", *args]


@pytest.mark.parametrize("i,words", [(i, words) for i, (_, words) in enumerate(TEMPNET_PADDING)])
def test_hf_to_checkpoint_keeps_a_tempnet_exports_padding(runs, i, words):
    d, out = result(runs, f"test_hf_to_checkpoint_keeps_a_tempnet_exports_padding[{i}]")
    assert_one_error(out, *words)
    assert not (d / "ckpt").exists()


@tool_run("test_hf_to_checkpoint_runs_inside_another_jobs_environment")
def make_hf_to_checkpoint_runs_inside_another_jobs_environment(d):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=32)
                     ).save_pretrained(d / "hf")
    return (["convert_hf_to_checkpoint.py", "--input", d / "hf", "--save", d / "ckpt"],
            BusyPort())


class BusyPort(dict):
    """A surrounding torchrun / SLURM step's environment whose MASTER_PORT is held by a
    listening socket for as long as the run lasts (``run_tool`` enters it)."""

    def __enter__(self):
        self.socket = listening_socket()
        self.update(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.socket.getsockname()[1]))
        return self

    def __exit__(self, *exc):
        self.socket.close()


def test_hf_to_checkpoint_runs_inside_another_jobs_environment(runs):
    """A surrounding torchrun / SLURM step's RANK, WORLD_SIZE and (busy) MASTER_PORT are not
    the converter's: it runs as one process on a free port, and says what it wrote."""
    d, out = result(runs, "test_hf_to_checkpoint_runs_inside_another_jobs_environment")
    assert out.returncode == 0, out.stderr[-4000:]
    assert (f"wrote {d / 'ckpt' / 'iter_0000000'}: llama 1 layers, hidden 32, "
            "vocabulary 100 padded to 128 (for TP=1), float32") in out.stdout, out.stdout
    assert "no TempNet (plain model)" in out.stdout and "--finetune" in out.stdout


# tools/convert_deepspeed_checkpoint.py

@tool_run("test_deepspeed_converter_refuses_a_megatron_core_checkpoint")
def make_deepspeed_converter_refuses_a_megatron_core_checkpoint(d):
    (d / "mc" / "iter_0000002").mkdir(parents=True)
    (d / "mc" / "iter_0000002" / "metadata.json").write_text("{}")
    (d / "mc" / "latest_checkpointed_iteration.txt").write_text("2\n")
    return ["convert_deepspeed_checkpoint.py", "--load", d / "mc", "--save", d / "out"]


def test_deepspeed_converter_refuses_a_megatron_core_checkpoint(runs):
    d, out = result(runs, "test_deepspeed_converter_refuses_a_megatron_core_checkpoint")
    assert_one_error(out, "megatron-core dist_checkpointing checkpoint, not a DeepSpeed")
    assert not (d / "out").exists()


# tools/convert_checkpoint_to_hf.py

@tool_run("test_checkpoint_to_hf_missing_load")
def make_checkpoint_to_hf_missing_load(d):
    return ["convert_checkpoint_to_hf.py", "--load", d / "nope", "--output", d / "hf"]


def test_checkpoint_to_hf_missing_load(runs):
    d, out = result(runs, "test_checkpoint_to_hf_missing_load")
    assert_one_error(out, "--load", str(d / "nope"), "no such directory")
    assert not (d / "hf").exists()


@tool_run("test_checkpoint_to_hf_load_without_checkpoint")
def make_checkpoint_to_hf_load_without_checkpoint(d):
    (d / "run" / "notes.txt").parent.mkdir()
    (d / "run" / "notes.txt").write_text("x")
    return ["convert_checkpoint_to_hf.py", "--load", d / "run", "--output", d / "hf"]


def test_checkpoint_to_hf_load_without_checkpoint(runs):
    d, out = result(runs, "test_checkpoint_to_hf_load_without_checkpoint")
    assert_one_error(out, "--load", "latest_checkpointed_iteration.txt", "notes.txt")
    assert not (d / "hf").exists()


@tool_run("test_checkpoint_to_hf_refuses_non_empty_output")
def make_checkpoint_to_hf_refuses_non_empty_output(d):
    output = d / "hf"
    output.mkdir()
    (output / "config.json").write_text("{}")
    return ["convert_checkpoint_to_hf.py", "--load", d / "run", "--output", output]


def test_checkpoint_to_hf_refuses_non_empty_output(runs):
    d, out = result(runs, "test_checkpoint_to_hf_refuses_non_empty_output")
    output = d / "hf"
    assert_one_error(out, f"--output {output}", "refusing to overwrite", "another --output")
    assert snapshot(output) == ["config.json"] and (output / "config.json").read_text() == "{}"


@tool_run("test_checkpoint_to_hf_missing_tokenizer_model")
def make_checkpoint_to_hf_missing_tokenizer_model(d):
    return ["convert_checkpoint_to_hf.py", "--load", d / "run", "--output", d / "hf",
            "--tokenizer-model", d / "sp.model"]


def test_checkpoint_to_hf_missing_tokenizer_model(runs):
    _, out = result(runs, "test_checkpoint_to_hf_missing_tokenizer_model")
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
