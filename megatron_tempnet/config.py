"""Configuration dataclasses. Values flow one way: YAML preset -> overrides -> dataclass.

Each dataclass validates its own fields (``validate``) and errors name the flag, the value and
the fix. Presets live in ``configs/models/<name>.yaml`` at the repository root.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_PRESET_DIR = REPO_ROOT / "configs" / "models"

FAMILIES = ("gpt", "llama")
# core attention without Transformer Engine: PyTorch SDPA (models/specs.py) or megatron's unfused
ATTENTION_BACKENDS = ("sdpa", "local")


class ConfigError(ValueError):
    """A bad input (a configuration value that cannot work, corrupt or foreign data, a
    checkpoint that does not fit the run); the message names the flag or file and the fix.
    Commands end with it as one line (``megatron_tempnet/cli.py``). ``rank_local``: only this
    rank can see the problem (it prints the line itself)."""

    def __init__(self, message: str, *, rank_local: bool = False):
        super().__init__(message)
        self.rank_local = rank_local


@dataclass
class ModelConfig:
    """Architecture of a GPT (GPT-2 style) or LLaMA model; one field per flag.

    gpt:   learned absolute positions, LayerNorm, GeLU (tanh approximation as GPT-2), biases.
    llama: RoPE, RMSNorm, SwiGLU, no biases, grouped-query attention, untied output layer.
    """

    family: str = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: one group per head (multi-head attention)
    ffn_hidden_size: int | None = None  # None: 4h (gpt) or LLaMA's 2/3*4h rounded to 256
    vocab_size: int | None = None  # the tokenizer's; padded for the model (see padded_vocab_size)
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 2048
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    tie_embeddings: bool | None = None  # None: gpt ties, llama does not
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    attention_backend: str = "sdpa"  # see ATTENTION_BACKENDS; Transformer Engine wins if present

    def __post_init__(self):
        if self.tie_embeddings is None:
            self.tie_embeddings = self.family == "gpt"
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = default_ffn_hidden_size(self.family, self.hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        if self.vocab_size is None:
            raise ConfigError("vocab_size is unknown: set --vocab-size or give a tokenizer")
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp)

    def validate(self, tp: int = 1, pp: int = 1) -> "ModelConfig":
        if self.family not in FAMILIES:
            raise ConfigError(f"--model-family {self.family!r} is unknown; choose one of {FAMILIES}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"--attention-backend {self.attention_backend!r} is unknown; "
                              f"choose one of {ATTENTION_BACKENDS}")
        h, n, g = self.hidden_size, self.num_attention_heads, self.num_query_groups
        if h % n:
            raise ConfigError(f"--hidden-size {h} is not divisible by --num-attention-heads {n}")
        if n % g:
            raise ConfigError(f"--num-attention-heads {n} is not divisible by "
                              f"--num-query-groups {g}")
        if n % tp:
            raise ConfigError(f"--num-attention-heads {n} is not divisible by "
                              f"--tensor-model-parallel-size {tp}: choose a TP size dividing {n}")
        if g % tp:
            raise ConfigError(f"--num-query-groups {g} is not divisible by "
                              f"--tensor-model-parallel-size {tp}: choose a TP size dividing {g}")
        if self.ffn_hidden_size % tp:
            raise ConfigError(f"--ffn-hidden-size {self.ffn_hidden_size} is not divisible by "
                              f"--tensor-model-parallel-size {tp}")
        if self.num_layers % pp:
            raise ConfigError(f"--num-layers {self.num_layers} is not divisible by "
                              f"--pipeline-model-parallel-size {pp}: choose a PP size dividing "
                              f"{self.num_layers}")
        return self


def default_ffn_hidden_size(family: str, hidden: int) -> int:
    if family == "llama":  # LLaMA: 2/3 * 4h rounded up to a multiple of 256
        return int(math.ceil(8 * hidden / 3 / 256) * 256)
    return 4 * hidden


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: the smallest multiple of divisible_by * TP holding the vocabulary."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def available_presets() -> list[str]:
    return sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml"))


def load_model_preset(name_or_path: str, **overrides) -> ModelConfig:
    """A ModelConfig from ``configs/models/<name>.yaml`` (or a YAML path), with overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = MODEL_PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown model preset {name_or_path!r}: available presets are "
                          f"{', '.join(available_presets())} (or give a path to a .yaml file)")
    values = yaml.safe_load(path.read_text()) or {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(ModelConfig, values, source=str(path))


def from_dict(cls, values: dict, source: str = "config"):
    """Build a dataclass from a dict, rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown {cls.__name__} field(s) {unknown}; "
                          f"known fields are {sorted(names)}")
    return cls(**values)


PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LR_DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    use_distributed_optimizer: bool = True

    def validate(self) -> "ParallelConfig":
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, "
                                  f"got {getattr(self, name)}")
        return self


@dataclass
class TrainConfig:
    """Optimisation and schedule of the LM (TempNet's own group lives in TempNetConfig)."""

    micro_batch_size: int = 4
    global_batch_size: int = 16
    seq_length: int = 128
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None  # None: train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = "fp32"
    seed: int = 1234
    log_interval: int = 10

    def validate(self, dp_size: int = 1) -> "TrainConfig":
        per_step = self.micro_batch_size * dp_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size {dp_size} = "
                f"{per_step}: choose a global batch that is a multiple of {per_step}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: choose one of {list(PRECISIONS)}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style {self.lr_decay_style!r}: choose one of "
                              f"{list(LR_DECAY_STYLES)}")
        if self.lr_warmup_iters >= (self.lr_decay_iters or self.train_iters) > 0 and \
                self.lr_decay_style != "constant":
            raise ConfigError(f"--lr-warmup-iters {self.lr_warmup_iters} must be smaller than "
                              f"the decay length {self.lr_decay_iters or self.train_iters}")
        return self

    def num_microbatches(self, dp_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp_size)
