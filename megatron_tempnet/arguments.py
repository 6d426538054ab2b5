"""Megatron-style command line: every flag maps to exactly one dataclass field.

Configuration flows one way:
    --model preset (configs/models/<name>.yaml) -> --config run.yaml -> command-line flags.

A run YAML has one mapping per section (``model:``, ``parallel:``, ``train:``, ``data:``,
``tempnet:``, ``checkpoint:``) whose keys are field names. Flags are ``--field-name`` (a boolean
flag alone means true, as Megatron-LM's ``--finetune``); TempNet fields carry a
``--tempnet-`` prefix; a few keep Megatron-LM's historic spelling (see ``_SECTION_PREFIX``).
Every value, flag or YAML, is converted to its field's type (config.coerce); :func:`resolve`
then checks the whole run for a world size before any process group or dataset exists.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from megatron_tempnet.config import (ConfigError, ModelConfig, ParallelConfig, TrainConfig,
                                     coerce_fields, from_dict, load_model_preset, load_yaml)
from megatron_tempnet.parallel.runtime import validate_layout
from megatron_tempnet.data.config import DataConfig
from megatron_tempnet.tempnet.config import TempNetConfig
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a GPT/LLaMA (+ TempNet) model with megatron-core.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--model", help="model preset name (configs/models/) or YAML path")
    parser.add_argument("--config", help="run YAML with one section per config dataclass "
                                         f"({'/'.join(SECTIONS)})")
    # The deepspeed launcher passes --local_rank; the rank comes from the environment it sets.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                        help=argparse.SUPPRESS)
    for flag, (section, name) in all_flags().items():
        hint = typing.get_type_hints(SECTIONS[section])[name]
        is_list, is_bool = typing.get_origin(hint) is list, hint is bool
        # values stay strings here: parse_args converts them by the field's type (config.coerce)
        parser.add_argument(flag, dest=f"{section}.{name}",
                            nargs="+" if is_list else "?" if is_bool else None,
                            const=True if is_bool else None, metavar=name.upper())
    return parser


def parse_args(argv=None) -> RunConfig:
    """preset -> --config run YAML -> flags, each value converted to its field's type; errors
    name the flag (``flag_name``) for run values and the preset file for preset values."""
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
    preset = ns.get("model")
    if preset:  # run values are typed (and named by flag) before the preset's own values
        model = load_model_preset(preset, **coerce_fields(ModelConfig, values["model"],
                                                          _flag_label("model")))
    else:
        model = from_dict(ModelConfig, values["model"], "model", _flag_label("model"))
    return RunConfig(model=model, **{s: from_dict(SECTIONS[s], values[s], s, _flag_label(s))
                                     for s in SECTIONS if s != "model"})


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

