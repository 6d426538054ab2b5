"""GPT <-> Hugging Face GPT2LMHeadModel: the key map.

GPT-2 stores its linear layers as Conv1D ([in, out], the transpose of nn.Linear) and its fused
attention as [all q | all k | all v] columns; megatron-core wants per-head [q_h | k_h | v_h] rows.
"""
from __future__ import annotations

import torch

from megatron_tempnet.config import ModelConfig
from megatron_tempnet.hf.common import (COPY, TRANSPOSE, VOCAB, Transform, convert_from_hf,
                                        convert_to_hf, pack_qkv, unpack_qkv)

L, H = "decoder.layers.{i}.", "transformer.h.{i}."


def _qkv_to_mcore(cfg, c_attn):
    """c_attn ([h, 3h] weight or [3h] bias) -> fused per-head QKV rows."""
    rows = c_attn.t() if c_attn.dim() == 2 else c_attn
    return pack_qkv(cfg, *rows.chunk(3, 0))


def _qkv_to_hf(cfg, qkv):
    rows = torch.cat(unpack_qkv(cfg, qkv), 0)
    return (rows.t().contiguous() if rows.dim() == 2 else rows,)


C_ATTN = Transform(_qkv_to_mcore, _qkv_to_hf)


def key_map(cfg: ModelConfig):
    rows = [
        ("embedding.word_embeddings.weight", ["transformer.wte.weight"], VOCAB),
        ("embedding.position_embeddings.weight", ["transformer.wpe.weight"], COPY),
        ("decoder.final_layernorm.weight", ["transformer.ln_f.weight"], COPY),
        ("decoder.final_layernorm.bias", ["transformer.ln_f.bias"], COPY),
    ]
    for p in ("weight", "bias"):
        rows += [
            (L + f"input_layernorm.{p}", [H + f"ln_1.{p}"], COPY),
            (L + f"self_attention.linear_qkv.{p}", [H + f"attn.c_attn.{p}"], C_ATTN),
            (L + f"self_attention.linear_proj.{p}", [H + f"attn.c_proj.{p}"],
             TRANSPOSE if p == "weight" else COPY),
            (L + f"pre_mlp_layernorm.{p}", [H + f"ln_2.{p}"], COPY),
            (L + f"mlp.linear_fc1.{p}", [H + f"mlp.c_fc.{p}"],
             TRANSPOSE if p == "weight" else COPY),
            (L + f"mlp.linear_fc2.{p}", [H + f"mlp.c_proj.{p}"],
             TRANSPOSE if p == "weight" else COPY),
        ]
    if not cfg.tie_embeddings:
        rows.append(("output_layer.weight", ["lm_head.weight"], VOCAB))
    return rows


def hf_config(cfg: ModelConfig, **extra):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers, n_head=cfg.num_attention_heads, n_inner=cfg.ffn_hidden_size,
        activation_function="gelu_new", layer_norm_epsilon=cfg.norm_epsilon,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=cfg.tie_embeddings, **extra)


def from_hf(hf: dict, cfg: ModelConfig) -> dict:
    return convert_from_hf(key_map, hf, cfg)


def to_hf(full: dict, cfg: ModelConfig) -> dict:
    return convert_to_hf(key_map, full, cfg)
