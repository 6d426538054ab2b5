"""Megatron-style command line: every flag maps to exactly one dataclass field.

Configuration flows one way (style.md practice 5):
    --model preset (configs/models/<name>.yaml) -> --config run.yaml -> command-line flags.

A run YAML has one mapping per section (``model:``, ``parallel:``, ``train:``, ``data:``,
``tempnet:``, ``checkpoint:``) whose keys are field names. Flags are ``--field-name`` (a boolean
flag alone means true, as Megatron-LM's ``--finetune``); TempNet fields carry a
``--tempnet-`` prefix; a few keep Megatron-LM's historic spelling (see ``_SECTION_PREFIX``).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_tempnet.config import (ConfigError, ModelConfig, ParallelConfig, TrainConfig,
                                     from_dict, load_model_preset)
from megatron_tempnet.data.config import DataConfig
from megatron_tempnet.tempnet.config import TempNetConfig
from megatron_tempnet.training.checkpointing import CheckpointConfig
from megatron_tempnet.training.deepspeed import DeepSpeedConfig
from megatron_tempnet.training.evaluate import EvalConfig
from megatron_tempnet.training.metrics_log import LoggingConfig

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


def _yaml_scalar(text: str):
    """A command-line value: int, float (1e-4 too, which YAML 1.1 reads as a string),
    true/false/null, or else the string itself."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    value = yaml.safe_load(text)
    return value if isinstance(value, (bool, type(None))) else text


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
        f = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
        is_list, is_bool = "list" in str(f.type), str(f.type) == "bool"
        parser.add_argument(flag, dest=f"{section}.{name}", type=str if is_list else _yaml_scalar,
                            nargs="+" if is_list else "?" if is_bool else None,
                            const=True if is_bool else None, metavar=name.upper())
    return parser


def parse_args(argv=None) -> RunConfig:
    ns = vars(build_parser().parse_args(argv))
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    if "config" in ns:
        run_yaml = yaml.safe_load(Path(ns["config"]).read_text()) or {}
        unknown = sorted(set(run_yaml) - set(SECTIONS) - {"preset"})
        if unknown:
            raise ConfigError(f"{ns['config']}: unknown section(s) {unknown}; sections are "
                              f"{sorted(SECTIONS)} (and 'preset')")
        for section in SECTIONS:
            values[section].update(run_yaml.get(section) or {})
        ns.setdefault("model", run_yaml.get("preset"))
    for key, value in ns.items():
        if "." in key:
            section, name = key.split(".", 1)
            values[section][name] = value
    preset = ns.get("model")
    model = (load_model_preset(preset, **values["model"]) if preset
             else from_dict(ModelConfig, values["model"], "model"))
    return RunConfig(model=model, **{s: from_dict(SECTIONS[s], values[s], s)
                                     for s in SECTIONS if s != "model"})

