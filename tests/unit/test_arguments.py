"""The command line: every flag maps to one field; presets, run YAML and flags compose in order."""
import pytest

from megatron_tempnet.arguments import all_flags, parse_args
from megatron_tempnet.config import ConfigError

# The pinned flag set, exactly: adding or renaming a flag is a deliberate change of these lists.
# Flags Megatron-LM (or DeepSpeed, for --deepspeed / --deepspeed_config) spells the same way:
MEGATRON_FLAGS = {"--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                  "--micro-batch-size", "--global-batch-size", "--seq-length", "--lr",
                  "--min-lr", "--train-iters", "--lr-warmup-iters", "--lr-decay-style",
                  "--lr-decay-iters", "--weight-decay", "--clip-grad", "--adam-beta1",
                  "--adam-beta2", "--adam-eps", "--data-path", "--split", "--tokenizer-type",
                  "--tokenizer-model", "--data-cache-path", "--num-workers",
                  "--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss",
                  "--mmap-bin-files", "--num-layers", "--hidden-size", "--num-attention-heads",
                  "--num-query-groups", "--ffn-hidden-size", "--make-vocab-size-divisible-by",
                  "--max-position-embeddings", "--vocab-size", "--norm-epsilon",
                  "--rotary-base", "--init-method-std", "--hidden-dropout",
                  "--attention-dropout", "--seed", "--log-interval", "--tensorboard-dir",
                  "--use-distributed-optimizer", "--eval-interval", "--eval-iters", "--save",
                  "--load", "--save-interval", "--exit-duration-in-mins",
                  "--exit-signal-handler", "--finetune", "--no-load-optim", "--no-load-rng",
                  "--deepspeed", "--deepspeed_config", "--sequence-parallel",
                  "--virtual-pipeline-model-parallel-size", "--context-parallel-size",
                  "--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size",
                  "--recompute-granularity", "--recompute-method", "--recompute-num-layers"}
# Ours: TempNet's section, the model family / attention / precision choices, checkpoint
# safety (keep-last, loss spike, collapse, checksums; Megatron-LM spells the schedule pair
# --override-opt_param-scheduler / --use-checkpoint-opt_param-scheduler), metrics and the
# evaluation's temperature grid.
OWN_FLAGS = {"--tempnet-rho", "--tempnet-tau-min", "--tempnet-tau-max", "--tempnet-arch",
             "--tempnet-tau0", "--tempnet-hidden-size", "--tempnet-dropout",
             "--tempnet-input-convention", "--tempnet-lr", "--tempnet-weight-decay",
             "--tempnet-lr-schedule", "--tempnet-loss-mode", "--tempnet-fixed-tau",
             "--tempnet-training-mode", "--dro-loss-impl", "--model-family",
             "--attention-backend", "--tie-embeddings", "--precision", "--keep-last",
             "--loss-spike-factor", "--collapse-patience", "--no-checkpoint-checksums",
             "--no-save-lock",             "--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler",
             "--metrics-jsonl", "--peak-tflops", "--temperature-min", "--temperature-max",
             "--temperature-points", "--refine-points", "--ece-bins", "--tau-histogram-bins"}


def test_flags_are_unique_and_include_megatrons():
    flags = all_flags()
    pinned = MEGATRON_FLAGS | OWN_FLAGS
    assert not MEGATRON_FLAGS & OWN_FLAGS
    assert set(flags) == pinned, (sorted(set(flags) - pinned), sorted(pinned - set(flags)))
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
