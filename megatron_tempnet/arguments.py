"""Megatron-style command line: every flag maps to exactly one dataclass field.

Configuration flows one way:
    --model preset (configs/models/<name>.yaml) -> --config run.yaml -> command-line flags.

A run YAML has one mapping per section (``model:``, ``parallel:``, ``train:``, ``data:``,
``tempnet:``, ``checkpoint:``, ...) whose keys are field names. Flags are ``--field-name`` (a
boolean flag alone means true, as Megatron-LM's ``--finetune``); TempNet fields carry a
``--tempnet-`` prefix; a few keep Megatron-LM's historic spelling (see ``_SECTION_PREFIX``).
Every value, flag or YAML, is converted to its field's type (config.coerce); :func:`resolve`
then checks the whole run for a world size before any process group or dataset exists.

``--help`` comes from one home, the config dataclasses' docstrings (their ``Attributes:``
block, :func:`parse_docstring`), with each field's default and, for a string field, the values
its validator accepts (``CHOICES``). Megatron-LM's other spellings of a setting that has a
field are aliases of that field's flag (``ALIASES``, ``--num-layers-per-virtual-pipeline-stage``);
the few Megatron-LM flags that change nothing here are accepted and say so (``NO_OP_FLAGS``,
``--distributed-backend``). docs/megatron_flags.md maps Megatron-LM's flags onto these. Any other
flag is an argparse error, and so is an abbreviation (``--seq-len`` is not ``--seq-length``).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import typing
from dataclasses import dataclass, field

from megatron_tempnet.config import (ATTENTION_BACKENDS, FAMILIES, LR_DECAY_STYLES, PRECISIONS,
                                     RECOMPUTE_GRANULARITIES, RECOMPUTE_METHODS, ConfigError,
                                     ModelConfig, ParallelConfig, TrainConfig,
                                     available_presets, coerce, coerce_fields, from_dict,
                                     load_model_preset, load_yaml, require_int)
from megatron_tempnet.parallel.runtime import validate_layout
from megatron_tempnet.data.config import DataConfig
from megatron_tempnet.data.tokenizers import TOKENIZER_TYPES
from megatron_tempnet.tempnet.config import (ARCHS, DRO_LOSS_IMPLS, INPUT_CONVENTIONS,
                                             LOSS_MODES, LR_SCHEDULES, TRAINING_MODES,
                                             TempNetConfig)
from megatron_tempnet.training.checkpoint_config import CheckpointConfig
from megatron_tempnet.training.config import DeepSpeedConfig, EvalConfig, LoggingConfig

SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "train": TrainConfig,
            "data": DataConfig, "tempnet": TempNetConfig, "checkpoint": CheckpointConfig,
            "eval": EvalConfig, "logging": LoggingConfig, "deepspeed": DeepSpeedConfig}
_SECTION_PREFIX = {"tempnet": "tempnet-"}
_FLAG_NAMES = {("model", "family"): "--model-family",
               # DeepSpeed's (and Megatron-DeepSpeed's) own spelling
               ("deepspeed", "deepspeed_config"): "--deepspeed_config",
               ("tempnet", "dro_loss_impl"): "--dro-loss-impl"}
# The values of a string field: the constants its section's validate checks. --help shows them;
# values stay strings until then, so a bad one is that validator's one-line ConfigError.
CHOICES = {("model", "family"): FAMILIES, ("model", "attention_backend"): ATTENTION_BACKENDS,
           ("train", "precision"): tuple(PRECISIONS),
           ("train", "lr_decay_style"): LR_DECAY_STYLES,
           ("train", "recompute_granularity"): RECOMPUTE_GRANULARITIES,
           ("train", "recompute_method"): RECOMPUTE_METHODS,
           ("data", "tokenizer_type"): tuple(TOKENIZER_TYPES),
           ("tempnet", "arch"): ARCHS, ("tempnet", "input_convention"): INPUT_CONVENTIONS,
           ("tempnet", "lr_schedule"): LR_SCHEDULES, ("tempnet", "loss_mode"): LOSS_MODES,
           ("tempnet", "training_mode"): TRAINING_MODES,
           ("tempnet", "dro_loss_impl"): DRO_LOSS_IMPLS}


@dataclass(frozen=True)
class Alias:
    """A Megatron-LM flag (taking no value) that means ``<its field's flag> <value>``: it has no
    field of its own (one home per setting). It beats the run YAML as any flag does; with its
    field's flag, or another alias, at a different value it is a ConfigError."""

    section: str
    name: str
    value: object
    note: str = ""


ALIASES = {
    "--bf16": Alias("train", "precision", "bf16"),
    "--fp16": Alias("train", "precision", "fp16"),
    "--recompute-activations": Alias("train", "recompute_granularity", "selective"),
    "--use-flash-attn": Alias("model", "attention_backend", "sdpa",
                              "PyTorch SDPA, which runs the flash-attention kernel on a GPU in "
                              "bf16/fp16; Transformer Engine's attention replaces it where "
                              "Transformer Engine is importable on a GPU"),
    "--no-mmap-bin-files": Alias("data", "mmap_bin_files", False),
    # Megatron-LM spells the pair with an underscore
    "--override-opt_param-scheduler": Alias("checkpoint", "override_opt_param_scheduler", True),
    "--use-checkpoint-opt_param-scheduler": Alias("checkpoint",
                                                  "use_checkpoint_opt_param_scheduler", True),
}
# Megatron-LM's --num-layers-per-virtual-pipeline-stage N: --virtual-pipeline-model-parallel-size
# num_layers / PP / N, converted once the model (its --model preset included) is known.
LAYERS_PER_VIRTUAL_STAGE = "--num-layers-per-virtual-pipeline-stage"
# Megatron-LM's switches off of fusions that models/gpt.py transformer_config never turns on:
# flag -> the TransformerConfig field that stays False (tests/unit/test_arguments.py checks it).
FUSIONS_OFF = {"--no-masked-softmax-fusion": "masked_softmax_fusion",
               "--no-bias-dropout-fusion": "bias_dropout_fusion",
               "--no-bias-gelu-fusion": "bias_activation_fusion",
               "--no-gradient-accumulation-fusion": "gradient_accumulation_fusion",
               "--no-rope-fusion": "apply_rope_fusion"}
# Megatron-LM flags that change nothing here (flag -> why), accepted so its command lines run.
NO_OP_FLAGS = {**{flag: f"no effect here: every model's TransformerConfig has {name}=False "
                        "(models/gpt.py)" for flag, name in FUSIONS_OFF.items()},
               "--use-mcore-models": "no effect here: every model is a megatron-core GPTModel "
                                     "(there are no legacy models)"}
# Megatron-LM's --distributed-backend: accepted when it names the backend this trainer picks
# anyway (parallel/runtime.py initialize: NCCL with CUDA, gloo without), else a ConfigError.
DISTRIBUTED_BACKEND = "--distributed-backend"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tempnet: TempNetConfig = field(default_factory=TempNetConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


def flag_name(section: str, name: str) -> str:
    return _FLAG_NAMES.get((section, name),
                           "--" + _SECTION_PREFIX.get(section, "") + name.replace("_", "-"))


def _flag_label(section: str):
    return lambda name: flag_name(section, name)


def all_flags() -> dict[str, tuple[str, str]]:
    """flag -> (section, field): the complete, pinned set of training flags."""
    flags = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            flag = flag_name(section, f.name)
            if flag in flags:
                raise RuntimeError(f"flag {flag} maps to two fields: {flags[flag]} and "
                                   f"{(section, f.name)}")
            flags[flag] = (section, f.name)
    return flags


_ENTRY = re.compile(r"    (\w+(?: / \w+)*): (\S.*)")


@functools.cache
def parse_docstring(cls) -> tuple[str, dict[str, str]]:
    """(description, field -> help text) from a config dataclass's docstring: the prose before
    its ``Attributes:`` line, then one entry per field, ``    name: text`` (``    a / b: text``
    for fields documented together) with continuation lines indented by 8. Whitespace is
    collapsed. A name that is not a field, a field documented twice or a line of another
    shape: RuntimeError (the docstring is the one home of the flags' help)."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    if "Attributes:" not in lines:
        raise RuntimeError(f"{cls.__name__}'s docstring has no 'Attributes:' block documenting "
                           "its fields (their --help text)")
    at = lines.index("Attributes:")
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines[at + 1:]:
        entry = _ENTRY.fullmatch(line)
        if entry:
            current = entry.group(1).split(" / ")
            for name in current:
                if name not in names or name in docs:
                    raise RuntimeError(f"{cls.__name__}'s docstring documents {name!r} "
                                       + ("twice" if name in docs else "which is no field"))
                docs[name] = [entry.group(2)]
        elif current and (line.startswith(" " * 8) or not line.strip()):
            for name in current:
                docs[name].append(line)
        else:
            raise RuntimeError(f"{cls.__name__}'s docstring: {line!r} is neither an entry "
                               "('    name: text') nor its continuation (indented by 8)")
    return (" ".join(" ".join(lines[:at]).split()),
            {name: " ".join(" ".join(text).split()) for name, text in docs.items()})


def _default_text(cls, name: str) -> str:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return _value_text(f.default_factory() if f.default is dataclasses.MISSING else f.default)


def _value_text(value) -> str:
    """A value as typed on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "[]"
    return str(value)


def field_help(section: str, name: str) -> str:
    """The --help text of a field's flag: its docstring entry, its choices (``CHOICES``) and
    its dataclass default."""
    cls = SECTIONS[section]
    text = parse_docstring(cls)[1].get(name, "")
    choices = CHOICES.get((section, name))
    if choices:
        text += f" choices: {', '.join(choices)}"
    return f"{text} (default: {_default_text(cls, name)})".strip()


def _alias_help(flag: str, alias: Alias) -> str:
    target = flag_name(alias.section, alias.name)
    return (f"Megatron-LM's spelling of {target} {_value_text(alias.value)}"
            + (f" ({alias.note})" if alias.note else "")
            + f"; an error with a different {target}")


def runtime_backend() -> str:
    """The torch.distributed backend parallel/runtime.py ``initialize`` picks when given none
    (training/stage.py gives none): NCCL with CUDA, gloo without."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def _escape(text: str) -> str:
    """Docstring text as argparse help: no reST literal quotes; % doubled (argparse formats
    help strings with %)."""
    return text.replace("``", "").replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--model PRESET] [--config RUN_YAML] [--FLAG VALUE ...] (--help lists "
              "the flags)",
        description="Train a GPT/LLaMA (+ TempNet) model with megatron-core. Values: --model "
                    "preset, then --config run YAML, then these flags. A boolean flag alone "
                    "means true (or give true/false).",
        epilog="Megatron-LM's flags and how they map onto these: docs/megatron_flags.md",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--model", metavar="PRESET",
                        help="model preset: a name in configs/models/ "
                             f"({', '.join(available_presets())}) or a YAML path; its values "
                             "replace the model section's defaults")
    parser.add_argument("--config", metavar="RUN_YAML",
                        help="run YAML with one section per config dataclass "
                             f"({'/'.join(SECTIONS)}) and an optional 'preset:'; flags "
                             "override it")
    # The deepspeed launcher passes --local_rank; the rank comes from the environment it sets.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                        help=argparse.SUPPRESS)
    groups = {section: parser.add_argument_group(
        f"{section} ({cls.__name__}; run YAML section '{section}:')",
        _escape(parse_docstring(cls)[0])) for section, cls in SECTIONS.items()}
    for flag, (section, name) in all_flags().items():
        hint = typing.get_type_hints(SECTIONS[section])[name]
        is_list, is_bool = typing.get_origin(hint) is list, hint is bool
        # values stay strings here: parse_args converts them by the field's type (config.coerce)
        groups[section].add_argument(flag, dest=f"{section}.{name}",
                                     nargs="+" if is_list else "?" if is_bool else None,
                                     const=True if is_bool else None, metavar=name.upper(),
                                     help=_escape(field_help(section, name)))
    for flag, alias in ALIASES.items():
        groups[alias.section].add_argument(flag, dest=flag, action="store_true",
                                           help=_escape(_alias_help(flag, alias)))
    vp_flag = flag_name("parallel", "virtual_pipeline_model_parallel_size")
    groups["parallel"].add_argument(
        LAYERS_PER_VIRTUAL_STAGE, dest=LAYERS_PER_VIRTUAL_STAGE, metavar="N",
        help=f"Megatron-LM's spelling of {vp_flag} as layers per model chunk: {vp_flag} = "
             "--num-layers / --pipeline-model-parallel-size / N (the --model preset's layers "
             f"included); N must divide the layers of each pipeline stage; an error with "
             f"{vp_flag}")
    compat = parser.add_argument_group(
        "Megatron-LM compatibility", "Megatron-LM flags accepted so that its command lines run, "
        "with no effect here (docs/megatron_flags.md lists the refused ones).")
    for flag, why in NO_OP_FLAGS.items():
        compat.add_argument(flag, dest=flag, action="store_true", help=_escape(why))
    compat.add_argument(DISTRIBUTED_BACKEND, dest=DISTRIBUTED_BACKEND, metavar="BACKEND",
                        help="no effect here: the backend is NCCL with CUDA and gloo without "
                             "(parallel/runtime.py); naming the other one is an error. "
                             "choices: nccl, gloo")
    return parser


def _apply_aliases(ns: dict, values: dict) -> None:
    """Each alias given sets its field as its field's flag would; an alias with that flag or
    another alias at a different value: ConfigError naming both."""
    given: dict[tuple[str, str], list] = {}
    for flag, alias in ALIASES.items():
        if flag in ns:
            given.setdefault((alias.section, alias.name), []).append((flag, alias.value))
    for (section, name), settings in given.items():
        target, key = flag_name(section, name), f"{section}.{name}"
        if key in ns:
            hint = typing.get_type_hints(SECTIONS[section])[name]
            settings.insert(0, (f"{target} {_value_text(ns[key])}",
                                coerce(ns[key], hint, target)))
        first_label, first = settings[0]
        for label, value in settings[1:]:
            if value != first:
                means = "; ".join(f"{f} means {target} {_value_text(a.value)}"
                                  for f, a in ALIASES.items() if f in (first_label, label))
                raise ConfigError(f"{first_label} and {label} conflict: they set {target} to "
                                  f"{_value_text(first)!r} and {_value_text(value)!r} "
                                  f"({means}): keep one of them")
        values[section][name] = first


def _check_distributed_backend(ns: dict) -> None:
    if DISTRIBUTED_BACKEND in ns:
        value, picked = ns[DISTRIBUTED_BACKEND], runtime_backend()
        if value != picked:
            raise ConfigError(f"{DISTRIBUTED_BACKEND} {value}: this trainer picks the backend "
                              f"itself, {picked} on this machine (NCCL with CUDA, gloo without: "
                              "parallel/runtime.py): drop the flag")


def _virtual_pipeline_size(value, run: RunConfig) -> int:
    """--virtual-pipeline-model-parallel-size from --num-layers-per-virtual-pipeline-stage N:
    the layers of each pipeline stage over N (Megatron-LM's conversion)."""
    flag = LAYERS_PER_VIRTUAL_STAGE
    n = coerce(value, int, flag)
    if n < 1:
        raise ConfigError(f"{flag} {n}: must be an integer >= 1 (layers per model chunk)")
    require_int(run.parallel, "pipeline_model_parallel_size", 1, "pipeline stages")
    require_int(run.model, "num_layers", 1, "transformer layers")
    pp, layers = run.parallel.pipeline_model_parallel_size, run.model.num_layers
    if layers % pp:
        raise ConfigError(f"{flag} {n}: --num-layers {layers} is not divisible by "
                          f"--pipeline-model-parallel-size {pp}: choose a PP size dividing "
                          f"{layers}")
    per_stage = layers // pp
    if per_stage % n:
        raise ConfigError(f"{flag} {n} does not divide the {per_stage} layers of each pipeline "
                          f"stage (--num-layers {layers} / --pipeline-model-parallel-size {pp}): "
                          f"choose a divisor of {per_stage}")
    if per_stage // n > 1 and pp < 2:
        raise ConfigError(f"{flag} {n} makes {per_stage // n} model chunks per pipeline rank "
                          "(the interleaved schedule), which needs "
                          f"--pipeline-model-parallel-size >= 2: add pipeline stages, or use "
                          f"{per_stage} (one chunk)")
    return per_stage // n


def given_fields(argv) -> set[tuple[str, str]]:
    """(section, field) of every value the command line ``argv`` gives (its flags and aliases),
    plus ("", "model") / ("", "config") when a preset / run YAML is given."""
    ns = vars(build_parser().parse_known_args(argv)[0])
    out = {("", key) for key in ("model", "config") if key in ns}
    out |= {tuple(key.split(".", 1)) for key in ns if "." in key}
    out |= {(a.section, a.name) for flag, a in ALIASES.items() if flag in ns}
    return out


def parse_args(argv=None) -> RunConfig:
    """preset -> --config run YAML -> flags, each value converted to its field's type; errors
    name the flag (``flag_name``) for run values and the preset file for preset values.
    Megatron-LM's aliases set their fields as flags do (``ALIASES``); the virtual pipeline size
    of --num-layers-per-virtual-pipeline-stage comes from the final model's layers."""
    ns = vars(build_parser().parse_args(argv))
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    if "config" in ns:
        path = ns["config"]
        run_yaml = load_yaml(path, "--config")
        unknown = sorted(set(run_yaml) - set(SECTIONS) - {"preset"})
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {unknown}; sections are "
                              f"{sorted(SECTIONS)} (and 'preset')")
        for section, cls in SECTIONS.items():
            body = run_yaml.get(section)
            if body is not None and not isinstance(body, dict):
                raise ConfigError(f"--config {path}: section {section!r} must be a mapping of "
                                  f"{cls.__name__} fields (field: value lines), got a "
                                  f"{type(body).__name__} {body!r}")
            values[section].update(body or {})
        preset = run_yaml.get("preset")
        if preset is not None and not isinstance(preset, str):
            raise ConfigError(f"--config {path}: preset {preset!r} must be a preset name or a "
                              "path to a .yaml file")
        ns.setdefault("model", preset)
    for key, value in ns.items():
        if "." in key:
            section, name = key.split(".", 1)
            values[section][name] = value
    _apply_aliases(ns, values)
    _check_distributed_backend(ns)
    vp_key = "parallel.virtual_pipeline_model_parallel_size"
    if LAYERS_PER_VIRTUAL_STAGE in ns and vp_key in ns:
        vp_flag = flag_name("parallel", "virtual_pipeline_model_parallel_size")
        raise ConfigError(f"{LAYERS_PER_VIRTUAL_STAGE} and {vp_flag} both set the model chunks "
                          f"per pipeline rank: keep one ({vp_flag} = layers per pipeline stage "
                          f"/ {LAYERS_PER_VIRTUAL_STAGE})")
    preset = ns.get("model")
    if preset:  # run values are typed (and named by flag) before the preset's own values
        model = load_model_preset(preset, **coerce_fields(ModelConfig, values["model"],
                                                          _flag_label("model")))
    else:
        model = from_dict(ModelConfig, values["model"], "model", _flag_label("model"))
    run = RunConfig(model=model, **{s: from_dict(SECTIONS[s], values[s], s, _flag_label(s))
                                    for s in SECTIONS if s != "model"})
    if LAYERS_PER_VIRTUAL_STAGE in ns:
        run.parallel.virtual_pipeline_model_parallel_size = _virtual_pipeline_size(
            ns[LAYERS_PER_VIRTUAL_STAGE], run)
    return run


def _check_layers_per_chunk(model: ModelConfig, par: ParallelConfig, tr: TrainConfig) -> None:
    """Virtual stages divide each pipeline stage's layers; --recompute-num-layers fits in one."""
    per_stage = model.num_layers // par.pipeline_model_parallel_size
    if per_stage % par.virtual_size:
        raise ConfigError(f"--virtual-pipeline-model-parallel-size {par.virtual_size} does not "
                          f"divide the {per_stage} layers of each pipeline stage (--num-layers "
                          f"{model.num_layers} / --pipeline-model-parallel-size "
                          f"{par.pipeline_model_parallel_size}): choose a divisor of "
                          f"{per_stage}")
    n = tr.recompute_num_layers
    if n is not None and n > per_stage // par.virtual_size:
        raise ConfigError(f"--recompute-num-layers {n} exceeds the "
                          f"{per_stage // par.virtual_size} layers of each model chunk "
                          f"(--num-layers {model.num_layers} over "
                          f"{par.pipeline_model_parallel_size} stage(s) x {par.virtual_size} "
                          "virtual stage(s)): lower it")


def resolve(run: RunConfig, world_size: int) -> RunConfig:
    """Check the whole run for ``world_size`` processes, before any process group, tokenizer
    load or dataset: every section's validate and every cross-section rule (layout, batch
    divisibility by the data-parallel size, heads/layers by TP/PP, --seq-length within
    --max-position-embeddings, frozen_lm with PP = 1, --tempnet-rho below log V). The caller
    sets ``run.model.vocab_size`` from the tokenizer first (the rho rule needs it; None skips
    it). Raises ConfigError; returns ``run`` unchanged (calling it again is harmless)."""
    par = run.parallel.validate()
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    try:
        dp = validate_layout(world_size, tp, pp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model, tr = run.model.validate(tp, pp), run.train.validate(dp)
    tempnet = run.tempnet.validate(vocab_size=model.vocab_size)
    for section in (run.checkpoint, run.eval, run.logging, run.deepspeed):
        section.validate()
    if tr.seq_length > model.max_position_embeddings:
        raise ConfigError(f"--seq-length {tr.seq_length} exceeds --max-position-embeddings "
                          f"{model.max_position_embeddings}: the {model.family} model has "
                          f"positions for {model.max_position_embeddings} tokens only; raise "
                          "--max-position-embeddings or lower --seq-length")
    _check_layers_per_chunk(model, par, tr)
    if par.virtual_size > 1 and tr.num_microbatches(dp) % pp:
        raise ConfigError(f"the interleaved pipeline (--virtual-pipeline-model-parallel-size "
                          f"{par.virtual_size}) needs the micro-batches per step "
                          f"({tr.num_microbatches(dp)}) to be a multiple of "
                          f"--pipeline-model-parallel-size {pp}: change --global-batch-size")
    if run.deepspeed.deepspeed:
        used = [flag for flag, on in (("--sequence-parallel", par.sequence_parallel),
                                      ("--virtual-pipeline-model-parallel-size",
                                       par.virtual_size > 1),
                                      ("--overlap-grad-reduce", par.overlap_grad_reduce),
                                      ("--overlap-param-gather", par.overlap_param_gather))
                if on]
        if used:
            raise ConfigError(f"{', '.join(used)}: megatron-core features that the DeepSpeed "
                              "engine path does not run (it reduces gradients itself): drop "
                              "--deepspeed, or drop them")
    if par.context_parallel_size > 1:
        raise ConfigError(f"--context-parallel-size {par.context_parallel_size}: context "
                          "parallelism is not wired into this trainer yet (its attention, data "
                          "split and loss need Transformer Engine's context-parallel path); use "
                          "--sequence-parallel with tensor parallelism")
    # the same rule as models/tempnet_gpt.py build_tempnet_model, before any process group
    if pp > 1 and tempnet.training_mode == "frozen_lm":
        raise ConfigError("--tempnet-training-mode frozen_lm needs "
                          "--pipeline-model-parallel-size 1 (only the last stage has TempNet); "
                          "use tensor or data parallelism instead")
    return run

