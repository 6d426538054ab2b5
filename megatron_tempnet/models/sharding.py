"""Full (TP=1, PP=1) state dicts <-> one rank's tensor/pipeline-parallel shards.

The "full" layout is megatron-core's own TP=1/PP=1 ``GPTModel`` state dict with global layer
numbers. A rank's local state dict uses local layer numbers (``decoder.layers.{i}``, i counted
from the start of its pipeline stage) and holds a slice of each tensor-parallel weight:

| parameter                               | TP split      |
|-----------------------------------------|---------------|
| embedding.word_embeddings, output_layer | vocab rows    |
| linear_qkv (weight, bias)               | rows (the rows are query-group major, so a row  |
|                                         | chunk is whole groups with their K and V)       |
| linear_fc1 (weight, bias)               | rows; with SwiGLU each of [gate; up] separately |
| linear_proj, linear_fc2 (weight)        | columns       |
| norms, row-parallel biases, positions   | replicated    |
| tempnet.w1 / tempnet.w_dir (TempNet, last stage) | columns (vocab, as the output rows) |
| tempnet.* other (b1, w2, ... / w_feat, ...) | replicated    |

Used by tests (load one set of weights at any layout) and by checkpoint conversion.
"""
from __future__ import annotations

import re

import torch

from megatron_tempnet.config import ModelConfig
from megatron_tempnet.tempnet.head import HEADS

# the one vocab-sharded tensor of each TempNet design (tempnet/head.py HEADS): "w1" / "w_dir" [M, V/tp]
TEMPNET_SHARDED = tuple(f"tempnet.{cls.SHARDED}" for cls in HEADS.values())

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def tp_split_dim(key: str) -> int | None:
    """The dimension along which `key` is split across tensor-parallel ranks (None: replicated)."""
    if key.endswith(("word_embeddings.weight", "output_layer.weight")):
        return 0
    if re.search(r"(linear_qkv|linear_fc1)\.(weight|bias)$", key):
        return 0
    if re.search(r"(linear_proj|linear_fc2)\.weight$", key):
        return 1
    if key.endswith(TEMPNET_SHARDED):  # TempNet's W1 / w_dir [M, V/tp]: vocab columns
        return 1
    return None


def _is_glu_fc1(key: str, cfg: ModelConfig) -> bool:
    return cfg.family == "llama" and "linear_fc1." in key


def _stage_layers(cfg: ModelConfig, pp_rank: int, pp_size: int) -> range:
    per_stage = cfg.num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _owned_by_stage(key: str, cfg: ModelConfig, pp_rank: int, pp_size: int) -> str | None:
    """The local name of a full-layout key on this stage, or None if another stage holds it."""
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    m = _LAYER.match(key)
    if m:
        layers = _stage_layers(cfg, pp_rank, pp_size)
        idx = int(m.group(1))
        return f"decoder.layers.{idx - layers.start}.{m.group(2)}" if idx in layers else None
    if key.startswith("embedding."):
        return key if first else None
    if key.startswith(("decoder.final_layernorm", "output_layer.", "tempnet.")):
        return key if last else None
    return key


def _split(tensor: torch.Tensor, dim: int, rank: int, size: int, glu: bool) -> torch.Tensor:
    if glu:  # [gate; up] -> [gate_r; up_r]
        return torch.cat([h.chunk(size, dim)[rank] for h in tensor.chunk(2, dim)], dim)
    return tensor.chunk(size, dim)[rank]


def _merge(shards: list[torch.Tensor], dim: int, glu: bool) -> torch.Tensor:
    if glu:
        halves = [s.chunk(2, dim) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves], dim),
                          torch.cat([h[1] for h in halves], dim)], dim)
    return torch.cat(shards, dim)


def full_to_local(full: dict, cfg: ModelConfig, tp_rank: int, tp_size: int, pp_rank: int = 0,
                  pp_size: int = 1) -> dict:
    """This rank's local state dict from a full one."""
    local = {}
    for key, tensor in full.items():
        name = _owned_by_stage(key, cfg, pp_rank, pp_size)
        if name is None:
            continue
        dim = tp_split_dim(key)
        local[name] = tensor if dim is None else _split(tensor, dim, tp_rank, tp_size,
                                                        _is_glu_fc1(key, cfg))
    last, first = pp_rank == pp_size - 1, pp_rank == 0
    if cfg.tie_embeddings and last and not first:
        # megatron-core keeps a copy of the tied embedding on the last stage as output_layer
        emb = full["embedding.word_embeddings.weight"]
        local["output_layer.weight"] = _split(emb, 0, tp_rank, tp_size, False)
    return local


def local_to_global_names(local: dict, cfg: ModelConfig, pp_rank: int, pp_size: int) -> dict:
    """Rename a stage's local keys to full-layout keys (layer numbers made global)."""
    offset = _stage_layers(cfg, pp_rank, pp_size).start
    out = {}
    for key, tensor in local.items():
        m = _LAYER.match(key)
        if m:
            key = f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}"
        out[key] = tensor
    return out


def merge_tp_shards(shards: list[dict], cfg: ModelConfig) -> dict:
    """Full tensors from the TP ranks' (globally named) dicts of one pipeline stage."""
    merged = {}
    for key in shards[0]:
        dim = tp_split_dim(key)
        parts = [s[key] for s in shards]
        merged[key] = parts[0] if dim is None else _merge(parts, dim, _is_glu_fc1(key, cfg))
    return merged


def model_tensors(model: torch.nn.Module) -> dict:
    """A model's parameters and buffers that carry weights (no megatron `_extra_state`)."""
    return {k: v for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def load_local(model: torch.nn.Module, local: dict) -> None:
    """Copy a local state dict into a model, requiring every weight tensor to be present."""
    own = model_tensors(model)
    missing = sorted(set(own) - set(local))
    unexpected = sorted(set(local) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the model: missing {missing}, "
                       f"unexpected {unexpected}")
    with torch.no_grad():
        for key, tensor in own.items():
            if tensor.shape != local[key].shape:
                raise ValueError(f"{key}: model has shape {tuple(tensor.shape)}, state dict "
                                 f"{tuple(local[key].shape)}")
            tensor.copy_(local[key])


def assemble_full(rank_locals: dict, cfg: ModelConfig, tp_size: int, pp_size: int) -> dict:
    """The full state dict from every rank's local one, keyed by (pp_rank, tp_rank)."""
    full = {}
    for pp_rank in range(pp_size):
        shards = [local_to_global_names(rank_locals[(pp_rank, t)], cfg, pp_rank, pp_size)
                  for t in range(tp_size)]
        stage = merge_tp_shards(shards, cfg)
        if cfg.tie_embeddings and pp_rank == pp_size - 1 and pp_rank != 0:
            stage.pop("output_layer.weight")  # the last stage's copy of the tied embedding
        full.update(stage)
    return full
