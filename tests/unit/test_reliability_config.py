"""Every bad configuration value is one clear ConfigError before start-up (arguments.resolve):
typed flag and YAML values, value ranges, cross-section rules, and the one-line exit of train."""
import dataclasses
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch.distributed as dist

from megatron_tempnet.arguments import parse_args, resolve
from megatron_tempnet.config import ConfigError, load_model_preset
from reliability import assert_one_error
from torchrun import REPO


def resolved(argv, world_size=1, vocab_size=None):
    run = parse_args(argv)
    if vocab_size is not None:
        run.model.vocab_size = vocab_size  # as the caller does from the tokenizer
    return resolve(run, world_size)


# --- typed values: flags and YAML are converted by the field's annotation --------------------

@pytest.mark.parametrize("argv,message", [
    (["--seq-length", "abc"], "--seq-length 'abc': expected an integer"),
    (["--seq-length", "2.5"], "--seq-length '2.5': expected an integer"),  # never truncated
    (["--lr", "abc"], "--lr 'abc': expected a number"),
    (["--finetune", "maybe"], "--finetune 'maybe': expected true or false"),
    (["--vocab-size", "many"], r"--vocab-size 'many': expected an integer \(or null\)"),
    (["--model", "tiny-gpt", "--num-layers", "x"], "--num-layers 'x': expected an integer"),
    (["--tempnet-rho", "high"], "--tempnet-rho 'high': expected a number"),
])
def test_flag_value_of_the_wrong_type(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_flag_values_take_their_field_types():
    run = parse_args(["--lr", "1e-3", "--seq-length", "12", "--adam-eps", "1",
                      "--vocab-size", "null", "--use-distributed-optimizer", "false",
                      "--train-iters", "1e3", "--split", "99,1,0"])
    assert run.train.lr == 0.001 and isinstance(run.train.lr, float)
    assert run.train.seq_length == 12 and run.train.train_iters == 1000
    assert run.train.adam_eps == 1.0 and isinstance(run.train.adam_eps, float)
    assert run.model.vocab_size is None and run.parallel.use_distributed_optimizer is False
    assert run.data.split == "99,1,0"


def test_yaml_values_take_their_field_types(tmp_path):
    path = tmp_path / "run.yaml"  # YAML 1.1 reads 1e-3 as a string and 1 as an int
    path.write_text("train:\n  lr: 1e-3\n  min_lr: 0\n  seq_length: '64'\ntempnet:\n  rho: 7\n")
    run = parse_args(["--config", str(path)])
    assert run.train.lr == 0.001 and isinstance(run.train.lr, float)
    assert run.train.min_lr == 0.0 and isinstance(run.train.min_lr, float)
    assert run.train.seq_length == 64 and isinstance(run.tempnet.rho, float)


@pytest.mark.parametrize("text,message", [
    ("train:\n  lr: abc\n", "--lr 'abc': expected a number"),
    ("train: 5\n", r"section 'train' must be a mapping of TrainConfig fields"),
    ("- lr\n- 1\n", r"run\.yaml: must be a mapping .*got a list"),
    ("train:\n  lr: [1\n", r"run\.yaml: not valid YAML"),
    ("preset: 7\n", "preset 7 must be a preset name or a path to a .yaml file"),
])
def test_bad_run_yaml(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(path)])


def test_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=f"--config {missing}: no such file"):
        parse_args(["--config", str(missing)])


@pytest.mark.parametrize("text,message", [
    ("- family\n- gpt\n", r"model preset .*bad\.yaml: must be a mapping"),
    ("family: gpt\nhidden_size: abc\n", r"bad\.yaml: hidden_size 'abc': expected an integer"),
])
def test_bad_preset_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_model_preset(str(path))


# --- value checks and cross-section rules, all in resolve -------------------------------------

@pytest.mark.parametrize("argv,world_size,message", [
    (["--seq-length", "0"], 1, r"--seq-length 0: must be an integer >= 1"),
    (["--micro-batch-size", "0"], 1, r"--micro-batch-size 0: must be an integer >= 1"),
    (["--global-batch-size", "0"], 1, r"--global-batch-size 0: must be an integer >= 1"),
    (["--train-iters", "0"], 1, r"--train-iters 0: must be an integer >= 1"),
    (["--num-layers", "0"], 1, r"--num-layers 0: must be an integer >= 1"),
    (["--hidden-size", "0"], 1, r"--hidden-size 0: must be an integer >= 1"),
    (["--num-attention-heads", "0"], 1, r"--num-attention-heads 0: must be an integer >= 1"),
    (["--vocab-size", "0"], 1, r"--vocab-size 0: must be an integer >= 1"),
    (["--max-position-embeddings", "0"], 1, r"--max-position-embeddings 0: must be an integer"),
    (["--log-interval", "0"], 1, r"--log-interval 0: must be an integer >= 1"),
    (["--lr", "nan"], 1, r"--lr nan: must be a finite number >= 0"),
    (["--lr", "-0.001"], 1, r"--lr -0.001: must be a finite number >= 0"),
    (["--lr", "1e-3", "--min-lr", "1e-2"], 1,
     r"--min-lr 0.01 > --lr 0.001: .*lower --min-lr or raise --lr"),
    (["--weight-decay", "-0.1"], 1, r"--weight-decay -0.1: must be a finite number >= 0"),
    (["--adam-beta1", "1"], 1, r"--adam-beta1 1.0: must be a finite number in \[0, 1\)"),
    (["--adam-eps", "0"], 1, r"--adam-eps 0.0: must be a finite number > 0"),
    (["--clip-grad", "-1"], 1, r"--clip-grad -1.0: must be a finite number >= 0"),
    (["--eval-iters", "-1"], 1, r"--eval-iters\) = -1: must be an integer >= 0"),
    (["--eval-interval", "-5"], 1, r"--eval-interval\) = -5: must be an integer >= 0"),
    (["--model", "tiny-gpt", "--seq-length", "512"], 1,
     "--seq-length 512 exceeds --max-position-embeddings 256: the gpt model .* raise "
     "--max-position-embeddings or lower --seq-length"),
    (["--model", "tiny-llama", "--seq-length", "512"], 1,
     "--seq-length 512 exceeds --max-position-embeddings 256: the llama model"),
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 6,
     r"world size 6 is not divisible by tensor-parallel size 2 x pipeline-parallel size 2 = 4: "
     "launch a multiple of 4 processes"),
    (["--tensor-model-parallel-size", "0"], 1,
     "--tensor-model-parallel-size 0: must be an integer >= 1"),
    (["--global-batch-size", "8", "--micro-batch-size", "4"], 4,
     "--global-batch-size 8 is not divisible by --micro-batch-size 4 x data-parallel size 4"),
    (["--model", "tiny-gpt", "--tensor-model-parallel-size", "8"], 8,
     "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 8"),
    (["--model", "tiny-gpt", "--pipeline-model-parallel-size", "2", "--tempnet-loss-mode",
      "tempnet_dro", "--tempnet-training-mode", "frozen_lm"], 2,
     r"--tempnet-training-mode frozen_lm needs --pipeline-model-parallel-size 1"),
    (["--tempnet-tau-min", "0"], 1, r"TempNetConfig\.tau_min \(--tempnet-tau-min\) = 0.0"),
    # scale: sequence parallelism, recomputation, the interleaved pipeline, CP, overlap
    (["--sequence-parallel"], 1, "--sequence-parallel needs --tensor-model-parallel-size >= 2"),
    (["--model", "tiny-llama", "--pipeline-model-parallel-size", "2",
      "--virtual-pipeline-model-parallel-size", "3"], 2,
     "--virtual-pipeline-model-parallel-size 3 does not divide the 2 layers of each pipeline "
     "stage"),
    (["--virtual-pipeline-model-parallel-size", "2"], 1,
     "needs --pipeline-model-parallel-size >= 2"),
    (["--model", "tiny-llama", "--pipeline-model-parallel-size", "2",
      "--virtual-pipeline-model-parallel-size", "2", "--global-batch-size", "12",
      "--micro-batch-size", "4"], 2, r"micro-batches per step \(3\) to be a multiple of "
     "--pipeline-model-parallel-size 2"),
    (["--model", "tiny-llama", "--recompute-granularity", "full", "--recompute-method",
      "uniform", "--recompute-num-layers", "5"], 1,
     "--recompute-num-layers 5 exceeds the 4 layers of each model chunk"),
    (["--recompute-granularity", "full"], 1,
     "--recompute-granularity full needs --recompute-method uniform|block"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "2"], 1,
     "apply to --recompute-granularity full only"),
    (["--recompute-granularity", "some"], 1, "--recompute-granularity 'some': choose one of"),
    (["--overlap-param-gather", "--use-distributed-optimizer", "false"], 1,
     "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--context-parallel-size", "2"], 2, "--context-parallel-size 2"),
])
def test_bad_value_is_one_config_error(argv, world_size, message):
    with pytest.raises(ConfigError, match=message):
        resolved(argv, world_size)


@pytest.mark.parametrize("mode", ["tempnet_dro", "dro_exact"])
def test_rho_at_or_above_log_vocab_never_binds(mode):
    argv = ["--tempnet-loss-mode", mode, "--tempnet-rho", "9.0"]
    with pytest.raises(ConfigError, match=r"--tempnet-rho 9\.0 >= log V = 7\.60 \(vocabulary "
                                          r"2000\): the DRO constraint KL\(p \|\| uniform\) <= "
                                          r"log V never binds.*choose rho < 7\.60 \(e\.g\. 5\.6"):
        resolved(argv, vocab_size=2000)
    with pytest.raises(ConfigError, match=r"--tempnet-rho 7\.6"):  # log 2000 = 7.6009
        resolved(["--tempnet-loss-mode", mode, "--tempnet-rho", "7.601"], vocab_size=2000)


@pytest.mark.parametrize("argv,vocab_size", [
    (["--tempnet-loss-mode", "tempnet_dro", "--tempnet-rho", "5.6"], 2000),  # below log V
    (["--tempnet-loss-mode", "tempnet_ce", "--tempnet-rho", "9.0"], 2000),  # rho unused
    (["--tempnet-loss-mode", "ce", "--tempnet-rho", "9.0"], 2000),
    (["--tempnet-loss-mode", "tempnet_dro", "--tempnet-rho", "9.0"], None),  # V not known yet
])
def test_rho_rule_applies_to_dro_modes_with_a_known_vocabulary(argv, vocab_size):
    resolved(argv, vocab_size=vocab_size)


@pytest.mark.parametrize("name,world_size", [
    ("gpt2-125m-tempnet", 8), ("llama2-7b-tempnet", 32), ("llama2-7b-tempnet-frozen", 8),
    ("llama2-13b-tempnet", 64), ("llama2-70b-tempnet", 128), ("tiny-llama-tempnet-smoke", 2),
])
def test_shipped_run_configs_resolve(name, world_size):
    run = parse_args(["--config", str(REPO / "configs" / "runs" / f"{name}.yaml")])
    run.model.vocab_size = run.model.vocab_size or 32000  # tiny-llama: LLaMA's tokenizer
    assert resolve(run, world_size) is run


def test_resolve_needs_no_process_group_and_is_idempotent(monkeypatch):
    def no_process_group(*args, **kwargs):
        raise AssertionError("resolve touched torch.distributed")

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    for name in ("init_process_group", "get_rank", "get_world_size", "new_group"):
        monkeypatch.setattr(dist, name, no_process_group)
    run = parse_args(["--model", "tiny-llama", "--tensor-model-parallel-size", "2",
                      "--pipeline-model-parallel-size", "2", "--global-batch-size", "8",
                      "--micro-batch-size", "2", "--seq-length", "64",
                      "--tempnet-loss-mode", "tempnet_dro", "--tempnet-rho", "5.0"])
    run.model.vocab_size = 500
    before = dataclasses.asdict(run)
    assert resolve(resolve(run, 8), 8) is run
    assert dataclasses.asdict(run) == before and 5.0 < math.log(500)
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        resolve(run, 6)


# --- end to end: python -m megatron_tempnet.train exits 2 with one line, no traceback ---------

BAD_TRAIN_VALUES = [
    (["--seq-length", "0"], "error: --seq-length 0: must be an integer >= 1"),
    (["--micro-batch-size", "0"], "error: --micro-batch-size 0: must be an integer >= 1"),
    (["--tempnet-loss-mode", "tempnet_dro", "--tempnet-rho", "9.0"],
     r"error: --tempnet-rho 9\.0 >= log V = 6\.21 \(vocabulary 500\)"),
]


@pytest.fixture(scope="module")
def bad_train_runs(tiny_corpus):
    """The commands of every BAD_TRAIN_VALUES case, started together (each a fresh Python
    process, mostly imports on one core; CI has 2 cores): futures, in that order."""
    with ThreadPoolExecutor(max_workers=len(BAD_TRAIN_VALUES)) as pool:
        yield [pool.submit(
            subprocess.run,
            [sys.executable, "-m", "megatron_tempnet.train", "--model", "tiny-gpt",
             *tiny_corpus.data_flags(), "--seq-length", "32", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--train-iters", "2", "--eval-iters", "0", *flags],
            cwd=REPO, capture_output=True, text=True, timeout=300)
            for flags, _ in BAD_TRAIN_VALUES]


@pytest.mark.parametrize("case", range(len(BAD_TRAIN_VALUES)),
                         ids=[" ".join(flags) for flags, _ in BAD_TRAIN_VALUES])
def test_train_command_bad_value_is_one_line(bad_train_runs, case):
    flags, message = BAD_TRAIN_VALUES[case]
    out = bad_train_runs[case].result()
    assert out.args[-len(flags):] == flags
    line = assert_one_error(out)
    assert re.match(message, line), line
