"""The command line: every flag maps to one field; presets, run YAML and flags compose in order;
Megatron-LM's own spellings (aliases, no-ops) and --help generated from the field docs."""
import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_tempnet.arguments import (ALIASES, CHOICES, DISTRIBUTED_BACKEND, FUSIONS_OFF,
                                        LAYERS_PER_VIRTUAL_STAGE, NO_OP_FLAGS, SECTIONS,
                                        all_flags, build_parser, field_help, flag_name,
                                        parse_args, parse_docstring)
from megatron_tempnet.config import ConfigError
from megatron_tempnet.data.tokenizers import TOKENIZER_TYPES

REPO = Path(__file__).resolve().parents[2]

# The pinned flag set, exactly: adding or renaming a flag is a deliberate change of these lists.
# Flags Megatron-LM (or DeepSpeed, for --deepspeed / --deepspeed_config) spells the same way:
MEGATRON_FLAGS = {"--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                  "--micro-batch-size", "--global-batch-size", "--seq-length", "--lr",
                  "--min-lr", "--train-iters", "--lr-warmup-iters", "--lr-decay-style",
                  "--lr-decay-iters", "--weight-decay", "--clip-grad", "--adam-beta1",
                  "--adam-beta2", "--adam-eps", "--data-path", "--split", "--tokenizer-type",
                  "--tokenizer-model", "--data-cache-path", "--num-workers",
                  "--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss",
                  "--num-layers", "--hidden-size", "--num-attention-heads",
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
# safety (keep-last, loss spike, collapse, checksums), metrics, the evaluation's temperature
# grid and temperature tools, and spellings of Megatron-LM settings whose Megatron-LM spelling
# is an alias
# (--mmap-bin-files: --no-mmap-bin-files; the schedule pair: --override-opt_param-scheduler /
# --use-checkpoint-opt_param-scheduler).
OWN_FLAGS = {"--tempnet-rho", "--tempnet-tau-min", "--tempnet-tau-max", "--tempnet-arch",
             "--tempnet-tau0", "--tempnet-hidden-size", "--tempnet-dropout",
             "--tempnet-input-convention", "--tempnet-lr", "--tempnet-weight-decay",
             "--tempnet-lr-schedule", "--tempnet-loss-mode", "--tempnet-fixed-tau",
             "--tempnet-training-mode", "--dro-loss-impl", "--model-family",
             "--attention-backend", "--tie-embeddings", "--precision", "--keep-last",
             "--loss-spike-factor", "--collapse-patience", "--no-checkpoint-checksums",
             "--no-save-lock", "--override-opt-param-scheduler",
             "--use-checkpoint-opt-param-scheduler", "--mmap-bin-files",
             "--metrics-jsonl", "--peak-tflops", "--temperature-min", "--temperature-max",
             "--temperature-points", "--refine-points", "--ece-bins", "--tau-histogram-bins",
             "--entropy-temperature-base", "--entropy-temperature-alpha",
             "--ensemble-temperatures", "--confidence-threshold", "--confident-temperature",
             "--uncertain-temperature"}


# Megatron-LM spellings with no field of their own: aliases of a field's flag ...
MEGATRON_ALIASES = {"--bf16", "--fp16", "--recompute-activations", "--use-flash-attn",
                    "--num-layers-per-virtual-pipeline-stage", "--no-mmap-bin-files",
                    "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"}
# ... and flags accepted with no effect here (each says why in --help).
MEGATRON_NO_OPS = {"--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
                   "--no-bias-gelu-fusion", "--no-gradient-accumulation-fusion",
                   "--no-rope-fusion", "--use-mcore-models", "--distributed-backend"}
# The command's own: the preset, the run YAML, and the launcher's --local_rank (hidden).
COMMAND_FLAGS = {"-h", "--help", "--model", "--config", "--local_rank", "--local-rank"}


def parser_flags(parser=None) -> dict:
    """option string -> argparse action, over every flag the train command accepts."""
    parser = parser or build_parser()
    return {o: a for a in parser._actions for o in a.option_strings}


def test_flags_are_unique_and_include_megatrons():
    flags = all_flags()
    pinned = MEGATRON_FLAGS | OWN_FLAGS
    assert not MEGATRON_FLAGS & OWN_FLAGS
    assert set(flags) == pinned, (sorted(set(flags) - pinned), sorted(pinned - set(flags)))
    fields = list(flags.values())
    assert len(fields) == len(set(fields))  # one flag per field, one field per flag


def test_the_command_accepts_exactly_the_pinned_flags():
    accepted = set(parser_flags())
    pinned = MEGATRON_FLAGS | OWN_FLAGS | MEGATRON_ALIASES | MEGATRON_NO_OPS | COMMAND_FLAGS
    assert accepted == pinned, (sorted(accepted - pinned), sorted(pinned - accepted))
    assert set(ALIASES) | {LAYERS_PER_VIRTUAL_STAGE} == MEGATRON_ALIASES
    assert set(NO_OP_FLAGS) | {DISTRIBUTED_BACKEND} == MEGATRON_NO_OPS
    for alias in ALIASES.values():  # an alias names a field (one home per setting)
        assert flag_name(alias.section, alias.name) in all_flags()


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


# --- Megatron-LM's spellings: aliases of a field's flag ----------------------------------------

@pytest.mark.parametrize("argv,section,name,value", [
    (["--bf16"], "train", "precision", "bf16"),
    (["--fp16"], "train", "precision", "fp16"),
    (["--bf16", "--precision", "bf16"], "train", "precision", "bf16"),  # agreeing: fine
    (["--recompute-activations"], "train", "recompute_granularity", "selective"),
    (["--use-flash-attn"], "model", "attention_backend", "sdpa"),
    (["--use-flash-attn", "--attention-backend", "sdpa"], "model", "attention_backend", "sdpa"),
    (["--no-mmap-bin-files"], "data", "mmap_bin_files", False),
    (["--override-opt_param-scheduler"], "checkpoint", "override_opt_param_scheduler", True),
    (["--use-checkpoint-opt_param-scheduler"], "checkpoint",
     "use_checkpoint_opt_param_scheduler", True),
])
def test_alias_sets_its_field(argv, section, name, value):
    assert getattr(getattr(parse_args(argv), section), name) == value


def test_alias_beats_the_run_yaml_as_a_flag_does(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  attention_backend: local\ntrain:\n  precision: fp32\n")
    run = parse_args(["--config", str(path), "--bf16", "--use-flash-attn"])
    assert run.train.precision == "bf16" and run.model.attention_backend == "sdpa"


@pytest.mark.parametrize("argv,message", [
    (["--bf16", "--fp16"], "--bf16 and --fp16 conflict: they set --precision to 'bf16' and "
                           "'fp16'"),
    (["--fp16", "--precision", "bf16"], "--precision bf16 and --fp16 conflict"),
    (["--precision", "fp32", "--bf16"], "--precision fp32 and --bf16 conflict"),
    (["--recompute-activations", "--recompute-granularity", "full"],
     "--recompute-granularity full and --recompute-activations conflict: they set "
     "--recompute-granularity to 'full' and 'selective'"),
    (["--use-flash-attn", "--attention-backend", "local"],
     "--attention-backend local and --use-flash-attn conflict"),
    (["--no-mmap-bin-files", "--mmap-bin-files"], "--mmap-bin-files true and "
                                                  "--no-mmap-bin-files conflict"),
    (["--model", "tiny-llama", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "1", "--virtual-pipeline-model-parallel-size",
      "2"], "--num-layers-per-virtual-pipeline-stage and --virtual-pipeline-model-parallel-size "
            "both set"),
])
def test_alias_conflict_is_one_line_naming_both_flags(argv, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_args(argv)
    assert "\n" not in str(error.value)


def test_layers_per_virtual_stage_uses_the_presets_layers():
    # llama2-7b: 32 layers; PP 4: 8 per stage; 2 per chunk: 4 chunks per pipeline rank
    run = parse_args(["--model", "llama2-7b", "--pipeline-model-parallel-size", "4",
                      "--num-layers-per-virtual-pipeline-stage", "2"])
    assert run.parallel.virtual_pipeline_model_parallel_size == 4
    run = parse_args(["--model", "llama2-7b", "--num-layers", "16",
                      "--pipeline-model-parallel-size", "2",
                      "--num-layers-per-virtual-pipeline-stage", "2"])
    assert run.parallel.virtual_pipeline_model_parallel_size == 4  # the flag's layers win


@pytest.mark.parametrize("argv,message", [
    (["--model", "tiny-llama", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "3"],
     r"--num-layers-per-virtual-pipeline-stage 3 does not divide the 2 layers of each pipeline "
     r"stage \(--num-layers 4 / --pipeline-model-parallel-size 2\): choose a divisor of 2"),
    (["--model", "tiny-llama", "--num-layers-per-virtual-pipeline-stage", "2"],
     "makes 2 model chunks per pipeline rank .* needs --pipeline-model-parallel-size >= 2"),
    (["--num-layers-per-virtual-pipeline-stage", "0"], "must be an integer >= 1"),
    (["--num-layers-per-virtual-pipeline-stage", "x"], "expected an integer"),
    (["--model", "tiny-llama", "--pipeline-model-parallel-size", "3",
      "--num-layers-per-virtual-pipeline-stage", "1"],
     "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
])
def test_layers_per_virtual_stage_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


# --- Megatron-LM flags accepted with no effect -------------------------------------------------

def test_no_op_flags_change_nothing():
    argv = sorted(NO_OP_FLAGS)
    assert dataclasses.asdict(parse_args(argv)) == dataclasses.asdict(parse_args([]))


def test_no_op_fusions_really_are_off():
    """What --no-*-fusion would switch off is off in every model's TransformerConfig."""
    from megatron_tempnet.config import load_model_preset
    from megatron_tempnet.models.gpt import transformer_config

    for preset in ("tiny-gpt", "tiny-llama"):
        config = transformer_config(load_model_preset(preset),
                                    SimpleNamespace(tp_size=1, pp_size=1))
        assert {name: getattr(config, name) for name in FUSIONS_OFF.values()} == \
            dict.fromkeys(FUSIONS_OFF.values(), False)


@pytest.mark.parametrize("cuda", [False, True])
def test_distributed_backend_only_as_the_runtime_picks_it(monkeypatch, cuda):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    picked, other = ("nccl", "gloo") if cuda else ("gloo", "nccl")
    parse_args([DISTRIBUTED_BACKEND, picked])
    with pytest.raises(ConfigError, match=f"--distributed-backend {other}: this trainer picks "
                                          f"the backend itself, {picked} on this machine"):
        parse_args([DISTRIBUTED_BACKEND, other])


@pytest.mark.parametrize("argv", [
    ["--seq-len", "8"],  # no abbreviations: it is not --seq-length
    ["--bf"], ["--num-layer", "2"],
    # refused Megatron-LM flags (docs/megatron_flags.md)
    ["--use-legacy-models"], ["--num-experts", "8"], ["--fp8-format", "hybrid"],
    ["--swiglu"], ["--normalization", "RMSNorm"], ["--position-embedding-type", "rope"],
    ["--untie-embeddings-and-output-weights"], ["--disable-bias-linear"],
    ["--group-query-attention"], ["--transformer-impl", "local"],
    ["--no-bias-swiglu-fusion"], ["--no-persist-layer-norm"],
])
def test_unknown_flag_is_an_argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {' '.join(argv)}" in capsys.readouterr().err


def test_megatron_tokenizer_names_are_listed():
    text = field_help("data", "tokenizer_type")
    assert f"choices: {', '.join(TOKENIZER_TYPES)}" in text
    for name in ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer",
                 "Llama2Tokenizer"):
        assert name in TOKENIZER_TYPES
        assert parse_args(["--tokenizer-type", name]).data.tokenizer_type == name


# --- --help: one home, the config dataclasses' docstrings ---------------------------------------

def test_every_field_is_documented_in_its_docstring():
    for section, cls in SECTIONS.items():
        description, docs = parse_docstring(cls)
        assert description, cls.__name__
        fields = [f.name for f in dataclasses.fields(cls)]
        assert sorted(docs) == sorted(fields), (cls.__name__, set(fields) ^ set(docs))
        assert all(docs.values()), cls.__name__


def test_every_flag_has_help_with_its_default_and_choices():
    actions = parser_flags()
    for flag, action in actions.items():
        if flag not in ("--local_rank", "--local-rank"):
            assert action.help and action.help.strip(), flag
    for flag, (section, name) in all_flags().items():
        help_ = actions[flag].help
        assert help_.startswith(parse_docstring(SECTIONS[section])[1][name].replace("``", ""))
        assert "(default: " in help_, flag
        choices = CHOICES.get((section, name))
        if choices:
            assert f"choices: {', '.join(choices)}" in help_, flag
    assert "(default: fp32)" in actions["--precision"].help
    assert "choices: fp32, bf16, fp16" in actions["--precision"].help
    assert "(default: false)" in actions["--finetune"].help
    assert "choices: ce, dro_fixed_tau" in actions["--tempnet-loss-mode"].help
    for flag in MEGATRON_NO_OPS:
        assert "no effect here" in actions[flag].help, flag
    for flag in MEGATRON_ALIASES:
        assert "Megatron-LM's spelling of --" in actions[flag].help, flag


def test_docstring_parser_is_strict():
    @dataclasses.dataclass
    class Shared:
        """Two fields, one entry.

        Attributes:
            a / b: the pair,
                on two lines.
        """
        a: int = 1
        b: int = 2

    @dataclasses.dataclass
    class Stale:
        """A stale entry.

        Attributes:
            gone: no such field.
        """
        a: int = 1

    @dataclasses.dataclass
    class Undocumented:
        a: int = 1

    assert parse_docstring(Shared) == ("Two fields, one entry.",
                                       {"a": "the pair, on two lines.",
                                        "b": "the pair, on two lines."})
    for cls in (Stale, Undocumented):
        with pytest.raises(RuntimeError, match=cls.__name__):
            parse_docstring(cls)


def test_help_groups_the_flags_by_section():
    text = build_parser().format_help()
    positions = [text.index(f"{section} ({cls.__name__}; run YAML section '{section}:')")
                 for section, cls in SECTIONS.items()]
    assert positions == sorted(positions)
    assert text.index("--bf16") > text.index("train (TrainConfig")
    assert text.index("--no-rope-fusion") > text.index("Megatron-LM compatibility")


def test_train_help_exits_0():
    out = subprocess.run([sys.executable, "-m", "megatron_tempnet.train", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for text in ("--tensor-model-parallel-size", "--bf16", "--no-rope-fusion",
                 "(default: 1234)", "choices: gpt, llama", "tempnet (TempNetConfig"):
        assert text in out.stdout, text


def test_megatron_flags_doc_maps_every_accepted_megatron_flag():
    doc = (REPO / "docs" / "megatron_flags.md").read_text()
    for flag in sorted(MEGATRON_FLAGS | MEGATRON_ALIASES | MEGATRON_NO_OPS):
        assert f"`{flag}" in doc, flag
