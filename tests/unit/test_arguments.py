"""The command line: every flag maps to one field; presets, run YAML and flags compose in order."""
import pytest

from megatron_tempnet.arguments import all_flags, parse_args
from megatron_tempnet.config import ConfigError

# The pinned flag set: adding or renaming a flag is a deliberate change of this list.
MEGATRON_FLAGS = {"--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                  "--micro-batch-size", "--global-batch-size", "--seq-length", "--lr",
                  "--min-lr", "--train-iters", "--lr-warmup-iters", "--lr-decay-style",
                  "--weight-decay", "--clip-grad", "--data-path", "--split", "--tokenizer-type",
                  "--tokenizer-model", "--num-layers", "--hidden-size", "--num-attention-heads",
                  "--num-query-groups", "--ffn-hidden-size", "--make-vocab-size-divisible-by",
                  "--max-position-embeddings", "--seed", "--log-interval",
                  "--use-distributed-optimizer", "--tempnet-rho", "--tempnet-tau-min",
                  "--tempnet-tau-max", "--save", "--load", "--save-interval",
                  "--exit-duration-in-mins", "--exit-signal-handler", "--finetune",
                  "--no-load-optim", "--no-load-rng"}
# Ours, beside Megatron-LM's: --keep-last (keep the newest k checkpoints) and
# --loss-spike-factor (stop when the loss exceeds factor x its running mean).
OWN_FLAGS = {"--keep-last", "--loss-spike-factor"}


def test_flags_are_unique_and_include_megatrons():
    flags = all_flags()
    pinned = MEGATRON_FLAGS | OWN_FLAGS
    assert pinned <= set(flags), sorted(pinned - set(flags))
    fields = list(flags.values())
    assert len(fields) == len(set(fields))  # one flag per field, one field per flag


def test_preset_then_yaml_then_flags(tmp_path):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("preset: llama2-7b\nmodel:\n  num_layers: 8\ntrain:\n  lr: 1.0e-4\n"
                        "  seq_length: 4096\n")
    run = parse_args(["--config", str(run_yaml), "--lr", "3e-4", "--tensor-model-parallel-size",
                      "8", "--data-path", "0.3", "a", "0.7", "b", "--tempnet-rho", "9.5"])
    assert run.model.hidden_size == 4096 and run.model.num_layers == 8  # preset, then YAML
    assert run.train.lr == 3e-4 and run.train.seq_length == 4096  # flag beats YAML
    assert run.parallel.tensor_model_parallel_size == 8
    assert run.data.data_path == ["0.3", "a", "0.7", "b"]
    assert run.tempnet.rho == 9.5


def test_boolean_flag_alone_means_true():
    run = parse_args(["--finetune", "--use-distributed-optimizer", "false"])
    assert run.checkpoint.finetune is True
    assert run.parallel.use_distributed_optimizer is False
    assert parse_args(["--finetune", "false"]).checkpoint.finetune is False


def test_unknown_yaml_section_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trainer'\]"):
        parse_args(["--config", str(bad)])


def test_batch_size_must_divide():
    run = parse_args(["--model", "tiny-llama", "--global-batch-size", "10",
                      "--micro-batch-size", "4"])
    with pytest.raises(ConfigError, match="--global-batch-size 10 is not divisible by "
                                          "--micro-batch-size 4 x data-parallel size 1"):
        run.train.validate(dp_size=1)
