"""Configuration dataclasses. Values flow one way: YAML preset -> overrides -> dataclass.

Every value from YAML or the command line is converted to its field's annotated type once
(:func:`coerce`, through :func:`from_dict`). Each dataclass validates its own fields
(``validate``) and errors name the flag, the value and the fix. Presets live in
``configs/models/<name>.yaml`` at the repository root.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
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

    The two families (``FAMILIES``) differ in fixed choices, not in flags: "gpt" has learned
    absolute positions, LayerNorm, GeLU (tanh approximation as GPT-2) and biases; "llama" has
    RoPE, RMSNorm, SwiGLU, no biases, grouped-query attention and an untied output layer.
    A ``--model`` preset (configs/models/) replaces the defaults below.

    Attributes:
        family: the model family, "gpt" or "llama" (above): it sets what Megatron-LM spells
            --position-embedding-type, --normalization, --swiglu and --disable-bias-linear.
        num_layers: transformer layers.
        hidden_size: model width (h).
        num_attention_heads: attention heads (the head size is hidden_size / heads).
        num_query_groups: key/value head groups of grouped-query attention; must divide the
            heads (None: one group per head, multi-head attention).
        ffn_hidden_size: MLP width (None: 4h for gpt, LLaMA's 2/3 x 4h rounded up to a
            multiple of 256 for llama).
        vocab_size: tokens in the vocabulary; train and evaluate set it from the tokenizer
            (a value given here is replaced), tools without a tokenizer (tools/estimate.py)
            read it. The embedding is padded (make_vocab_size_divisible_by).
        make_vocab_size_divisible_by: pad the vocabulary to a multiple of this x the
            tensor-parallel size (Megatron's padding).
        max_position_embeddings: longest sequence the model has positions for (gpt's learned
            position table; --seq-length may not exceed it).
        norm_epsilon: epsilon of the LayerNorm / RMSNorm.
        rotary_base: base (theta) of the rotary position embedding (llama only).
        tie_embeddings: share the input embedding and the output layer's weights (None: gpt
            ties, llama does not; Megatron-LM's --untie-embeddings-and-output-weights is
            --tie-embeddings false).
        init_method_std: standard deviation of the normal weight initialisation.
        hidden_dropout: dropout probability of the attention and MLP outputs.
        attention_dropout: dropout probability of the attention weights.
        attention_backend: core attention without Transformer Engine: "sdpa" (PyTorch's
            scaled_dot_product_attention, which picks the flash or memory-efficient kernel on
            a GPU; models/specs.py) or "local" (megatron-core's unfused attention). Transformer
            Engine's attention is used instead when it is importable on a GPU.
    """

    family: str = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 2048
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    tie_embeddings: bool | None = None
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    attention_backend: str = "sdpa"

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
        require_int(self, "num_layers", 1, "transformer layers")
        require_int(self, "hidden_size", 1, "model width")
        require_int(self, "num_attention_heads", 1, "attention heads")
        require_int(self, "num_query_groups", 1, "key/value head groups")
        require_int(self, "ffn_hidden_size", 1, "MLP width")
        if self.vocab_size is not None:
            require_int(self, "vocab_size", 1, "tokens in the vocabulary")
        require_int(self, "make_vocab_size_divisible_by", 1, "padding multiple of the vocabulary")
        require_int(self, "max_position_embeddings", 1, "longest sequence the model has "
                                                        "positions for")
        require_number(self, "norm_epsilon", "> 0", lambda v: v > 0)
        require_number(self, "rotary_base", "> 0", lambda v: v > 0)
        require_number(self, "init_method_std", ">= 0", lambda v: v >= 0)
        for name in ("hidden_dropout", "attention_dropout"):
            require_number(self, name, "in [0, 1)", lambda v: 0 <= v < 1)
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


def flag_of(name: str) -> str:
    """The flag of a field of this module's dataclasses (arguments.flag_name for all sections)."""
    return "--model-family" if name == "family" else "--" + name.replace("_", "-")


def _fix(config, name: str) -> str:
    """'e.g. --flag <default>', or for a field whose default is None 'or leave --flag out'."""
    default = {f.name: f.default for f in dataclasses.fields(config)}.get(name)
    return (f"or leave {flag_of(name)} out" if default is None or default is dataclasses.MISSING
            else f"e.g. {flag_of(name)} {default!r}")


def require_int(config, name: str, minimum: int, meaning: str) -> None:
    """ConfigError unless ``config.<name>`` is an integer >= ``minimum``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag_of(name)} {value!r}: must be an integer >= {minimum} "
                          f"({meaning}); {_fix(config, name)}")


def require_number(config, name: str, rule: str, ok) -> None:
    """ConfigError unless ``config.<name>`` is a finite number with ``ok(value)`` (``rule``)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{flag_of(name)} {value!r}: must be a finite number {rule}; "
                          f"{_fix(config, name)}")


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
    values = load_yaml(path, "model preset")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(ModelConfig, values, source=str(path))


def load_yaml(path, what: str) -> dict:
    """The mapping in a YAML file (empty file: {}); a missing file, bad YAML or anything but a
    mapping -> ConfigError naming ``what`` (e.g. "--config") and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        why = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{what} {path}: not valid YAML ({why}{where}): fix the file") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path}: must be a mapping (field: value lines), got a "
                          f"{type(values).__name__}")
    return values


_NULL_WORDS = ("null", "none", "~")
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
               "false": False, "no": False, "off": False, "0": False}
_BAD = object()


def _to_float(value):
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return _BAD
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else _BAD


def _to_int(value):
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            value = _to_float(value)  # "1e3"
    if isinstance(value, float) and value.is_integer():  # 2.5 is an error, never truncated
        return int(value)
    return _BAD


def _to_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return _BOOL_WORDS.get(value.strip().lower(), _BAD) if isinstance(value, str) else _BAD


def _to_str(value):
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _BAD


_CONVERTERS = {int: (_to_int, "an integer"), float: (_to_float, "a number"),
               bool: (_to_bool, "true or false"), str: (_to_str, "a string")}


def coerce(value, annotation, label: str):
    """``value`` (from YAML or the command line, where it may be a string) as the field type
    ``annotation``: int ("12", 12.0; never 2.5), float ("1e-3", which YAML 1.1 reads as a string;
    an int), bool (true/false/yes/no/on/off/1/0), str, list[X], X | None ("null"/"none"/"~").
    Other annotations pass the value through. Else ConfigError "<label> <value>: expected ..."."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if optional:
        if value is None or isinstance(value, str) and value.strip().lower() in _NULL_WORDS:
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (typing.Any,)
        if value is None:
            raise ConfigError(f"{label} None: expected a list of values")
        return [coerce(v, item, label) for v in (value if isinstance(value, (list, tuple))
                                                 else [value])]
    if annotation not in _CONVERTERS:
        return value
    convert, expected = _CONVERTERS[annotation]
    result = convert(value)
    if result is _BAD:
        raise ConfigError(f"{label} {value!r}: expected {expected}"
                          + (" (or null)" if optional else ""))
    return result


def coerce_fields(cls, values: dict, label) -> dict:
    """``values`` with each known field's value coerced to its type; ``label(field)`` names it in
    errors (unknown keys are left for :func:`from_dict` to report)."""
    hints = typing.get_type_hints(cls)
    return {k: coerce(v, hints[k], label(k)) if k in hints else v for k, v in values.items()}


def from_dict(cls, values: dict, source: str = "config", label=None):
    """Build a dataclass from a dict, rejecting unknown keys by name and converting every value
    to its field's type (:func:`coerce`; errors name ``label(field)``, default
    "<source>: <field>")."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown {cls.__name__} field(s) {unknown}; "
                          f"known fields are {sorted(names)}")
    return cls(**coerce_fields(cls, values, label or (lambda name: f"{source}: {name}")))


PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LR_DECAY_STYLES = ("constant", "linear", "cosine")


RECOMPUTE_GRANULARITIES = ("selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass
class ParallelConfig:
    """How the model, the sequence and the data are split over the ranks (megatron-core).

    Attributes:
        tensor_model_parallel_size: ranks splitting every layer's weight matrices (TP).
        pipeline_model_parallel_size: pipeline stages, each a contiguous run of layers (PP).
        virtual_pipeline_model_parallel_size: model chunks per pipeline rank for the
            interleaved 1F1B schedule (smaller pipeline bubble; None: one chunk); must divide
            the layers per stage. Megatron-LM's --num-layers-per-virtual-pipeline-stage N
            gives it as num_layers / PP / N.
        sequence_parallel: with TP > 1, the layer norms, dropouts and residuals work on 1/TP
            of the sequence (Megatron's sequence parallelism: their activations shrink
            TP-fold).
        context_parallel_size: ranks splitting the sequence inside attention (CP); needs
            Transformer Engine's attention, and this trainer does not wire it in yet (a size
            above 1 is an error).
        use_distributed_optimizer: shard the fp32 main weights and Adam state over
            data-parallel ranks (ZeRO-1).
        overlap_grad_reduce: reduce the gradient buckets over data-parallel ranks during the
            backward pass.
        overlap_param_gather: with the distributed optimizer, gather the updated weights
            during the next forward pass.
        ddp_bucket_size: parameters per gradient-reduction bucket (None: megatron-core's
            default, max(40M, 1M x DP) with overlap, one bucket without).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    ddp_bucket_size: int | None = None

    def validate(self) -> "ParallelConfig":
        require_int(self, "tensor_model_parallel_size", 1, "tensor-parallel ranks")
        require_int(self, "pipeline_model_parallel_size", 1, "pipeline stages")
        require_int(self, "context_parallel_size", 1, "context-parallel ranks")
        if self.virtual_pipeline_model_parallel_size is not None:
            require_int(self, "virtual_pipeline_model_parallel_size", 1,
                        "model chunks per pipeline rank")
            if self.virtual_pipeline_model_parallel_size > 1 \
                    and self.pipeline_model_parallel_size < 2:
                raise ConfigError(
                    f"--virtual-pipeline-model-parallel-size "
                    f"{self.virtual_pipeline_model_parallel_size} needs "
                    "--pipeline-model-parallel-size >= 2 (it interleaves the pipeline stages); "
                    "drop it or add pipeline stages")
        if self.ddp_bucket_size is not None:
            require_int(self, "ddp_bucket_size", 1, "parameters per gradient bucket")
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size >= 2 (it "
                              "splits the sequence over the tensor-parallel ranks): drop it or "
                              "raise the tensor-parallel size")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer (only "
                              "the distributed optimizer gathers parameters): add it or drop "
                              "--overlap-param-gather")
        if self.context_parallel_size > 1 and not transformer_engine_available():
            raise ConfigError(f"--context-parallel-size {self.context_parallel_size} needs "
                              "Transformer Engine's attention, which is not importable here "
                              "(megatron-core's local and our SDPA attention split no sequence): "
                              "install transformer-engine on a GPU machine, or use "
                              "--sequence-parallel with tensor parallelism instead")
        return self

    @property
    def virtual_size(self) -> int:
        """Model chunks per pipeline rank (1 without the interleaved schedule)."""
        return self.virtual_pipeline_model_parallel_size or 1


def transformer_engine_available() -> bool:
    """Transformer Engine importable on a CUDA device (its attention is what CP needs)."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        return False
    import torch

    return torch.cuda.is_available()


@dataclass
class TrainConfig:
    """Optimisation and schedule of the LM (TempNet's own group lives in TempNetConfig), and
    activation recomputation.

    Attributes:
        micro_batch_size: sequences per micro-batch on each data-parallel rank.
        global_batch_size: sequences per optimizer step; micro-batches accumulate to it
            (global / (micro x DP) of them per step).
        seq_length: tokens per training sequence.
        train_iters: optimizer steps to train for.
        lr: peak learning rate of the LM (reached after the warm-up).
        min_lr: learning rate the decay ends at.
        lr_warmup_iters: steps of the linear warm-up from 0 to lr (0: none).
        lr_decay_style: shape of the decay from lr to min_lr after the warm-up.
        lr_decay_iters: step at which the decay reaches min_lr, warm-up included (None:
            train_iters).
        weight_decay: decoupled (AdamW) weight decay of the LM's weights (not of biases
            and 1-D parameters).
        adam_beta1: Adam's decay rate of the gradient's first moment.
        adam_beta2: Adam's decay rate of the gradient's second moment.
        adam_eps: Adam's epsilon.
        clip_grad: clip the global gradient norm to this (0: no clipping).
        precision: parameter and compute dtype: "fp32", "bf16" (fp32 main weights in the
            optimizer) or "fp16" (also a dynamic loss scale). Megatron-LM's --bf16 / --fp16
            are --precision bf16 / fp16.
        seed: random seed of the weights' initialisation (Python, NumPy, torch and
            megatron-core's model-parallel RNG) and of the data's sample order.
        log_interval: iterations between training log lines.
        recompute_granularity: "selective" recomputes the core attention (softmax(QK^T)V:
            the memory that grows with the sequence squared) in the backward pass; "full"
            recomputes whole transformer layers (None: no recomputation). Megatron-LM's
            --recompute-activations is --recompute-granularity selective.
        recompute_method: with "full": "uniform" checkpoints the layers in groups of
            recompute_num_layers; "block" recomputes the first recompute_num_layers layers of
            each pipeline stage and keeps the others' activations.
        recompute_num_layers: layers per group ("uniform") or per stage ("block").
    """

    micro_batch_size: int = 4
    global_batch_size: int = 16
    seq_length: int = 128
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = "fp32"
    seed: int = 1234
    log_interval: int = 10
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None

    def validate(self, dp_size: int = 1) -> "TrainConfig":
        require_int(self, "micro_batch_size", 1, "sequences per micro-batch and data-parallel "
                                                 "rank")
        require_int(self, "global_batch_size", 1, "sequences per optimizer step")
        require_int(self, "seq_length", 1, "tokens per sequence")
        require_int(self, "train_iters", 1, "optimizer steps")
        require_int(self, "lr_warmup_iters", 0, "warm-up steps")
        if self.lr_decay_iters is not None:
            require_int(self, "lr_decay_iters", 1, "decay steps")
        require_int(self, "seed", 0, "random seed")
        require_int(self, "log_interval", 1, "iterations between log lines")
        for name in ("lr", "min_lr", "weight_decay"):
            require_number(self, name, ">= 0", lambda v: v >= 0)
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr!r} > --lr {self.lr!r}: the schedule decays "
                              "from --lr down to --min-lr; lower --min-lr or raise --lr")
        for name in ("adam_beta1", "adam_beta2"):
            require_number(self, name, "in [0, 1)", lambda v: 0 <= v < 1)
        require_number(self, "adam_eps", "> 0", lambda v: v > 0)
        require_number(self, "clip_grad", ">= 0 (0: no clipping)", lambda v: v >= 0)
        per_step = self.micro_batch_size * dp_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size {dp_size} = "
                f"{per_step}: choose a global batch that is a multiple of {per_step}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: choose one of {list(PRECISIONS)}")
        self._validate_recompute()
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style {self.lr_decay_style!r}: choose one of "
                              f"{list(LR_DECAY_STYLES)}")
        if self.lr_warmup_iters >= (self.lr_decay_iters or self.train_iters) > 0 and \
                self.lr_decay_style != "constant":
            raise ConfigError(f"--lr-warmup-iters {self.lr_warmup_iters} must be smaller than "
                              f"the decay length {self.lr_decay_iters or self.train_iters}")
        return self

    def _validate_recompute(self) -> None:
        g, method, n = (self.recompute_granularity, self.recompute_method,
                        self.recompute_num_layers)
        if g is not None and g not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(f"--recompute-granularity {g!r}: choose one of "
                              f"{list(RECOMPUTE_GRANULARITIES)}")
        if method is not None and method not in RECOMPUTE_METHODS:
            raise ConfigError(f"--recompute-method {method!r}: choose one of "
                              f"{list(RECOMPUTE_METHODS)}")
        if g == "full" and (method is None or n is None):
            raise ConfigError("--recompute-granularity full needs --recompute-method "
                              "uniform|block and --recompute-num-layers N (e.g. uniform 1: "
                              "every layer)")
        if g != "full" and (method is not None or n is not None):
            raise ConfigError("--recompute-method / --recompute-num-layers apply to "
                              "--recompute-granularity full only"
                              + ("" if g is None else f" (this run: {g!r}, which recomputes "
                                 "the core attention of every layer)") + ": drop them")
        if n is not None:
            require_int(self, "recompute_num_layers", 1, "layers per recompute group or stage")

    def num_microbatches(self, dp_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp_size)
