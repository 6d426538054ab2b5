"""Transforms shared by the Hugging Face key maps (one file per model family beside this one).

A key map is a list of ``(mcore_key, hf_keys, transform)`` rows with ``{i}`` standing for the
layer number; a transform turns the HF tensors into the megatron-core tensor and back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_tempnet.config import ModelConfig


@dataclass(frozen=True)
class Transform:
    to_mcore: Callable  # (cfg, *hf_tensors) -> mcore tensor
    to_hf: Callable  # (cfg, mcore tensor) -> tuple of hf tensors


COPY = Transform(lambda cfg, t: t, lambda cfg, t: (t,))
TRANSPOSE = Transform(lambda cfg, t: t.t().contiguous(), lambda cfg, t: (t.t().contiguous(),))
CONCAT = Transform(lambda cfg, *ts: torch.cat(ts, 0), lambda cfg, t: tuple(t.chunk(2, 0)))


def pad_vocab(cfg: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    """Append zero rows up to the padded vocabulary (padded rows are never a target)."""
    rows = cfg.padded_vocab_size() - t.shape[0]
    return torch.cat([t, t.new_zeros(rows, *t.shape[1:])]) if rows else t


VOCAB = Transform(pad_vocab, lambda cfg, t: (t[: cfg.vocab_size].contiguous(),))


def pack_qkv(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Separate Q, K, V rows -> megatron-core's query-group-major fused QKV rows:
    for each query group g: [q heads of g | k_g | v_g]."""
    g, d = cfg.num_query_groups, cfg.head_dim
    rest = q.shape[1:]
    q = q.reshape(g, -1, *rest)
    k, v = k.reshape(g, d, *rest), v.reshape(g, d, *rest)
    return torch.cat([q, k, v], 1).reshape(-1, *rest)


def unpack_qkv(cfg: ModelConfig, qkv: torch.Tensor):
    g, d = cfg.num_query_groups, cfg.head_dim
    rest = qkv.shape[1:]
    per_group = qkv.reshape(g, -1, *rest)
    q_rows = per_group.shape[1] - 2 * d
    q, k, v = per_group.split([q_rows, d, d], 1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


QKV = Transform(pack_qkv, unpack_qkv)


def convert_from_hf(key_map, hf: dict, cfg: ModelConfig) -> dict:
    """A full megatron-core state dict from a Hugging Face one."""
    full = {}
    for mcore_key, hf_keys, tr in _expand(key_map, cfg):
        missing = [k for k in hf_keys if k not in hf]
        if missing:
            raise KeyError(f"Hugging Face state dict lacks {missing} (needed for {mcore_key})")
        full[mcore_key] = tr.to_mcore(cfg, *(hf[k] for k in hf_keys))
    return full


def convert_to_hf(key_map, full: dict, cfg: ModelConfig) -> dict:
    """A Hugging Face state dict from a full megatron-core one."""
    hf = {}
    for mcore_key, hf_keys, tr in _expand(key_map, cfg):
        if mcore_key not in full:
            raise KeyError(f"megatron state dict lacks {mcore_key}")
        hf.update(zip(hf_keys, tr.to_hf(cfg, full[mcore_key])))
    return hf


def _expand(key_map, cfg: ModelConfig):
    for mcore_key, hf_keys, tr in key_map(cfg):
        if "{i}" in mcore_key:
            for i in range(cfg.num_layers):
                yield mcore_key.format(i=i), [k.format(i=i) for k in hf_keys], tr
        else:
            yield mcore_key, hf_keys, tr
