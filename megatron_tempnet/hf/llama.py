"""LLaMA <-> Hugging Face LlamaForCausalLM: the key map."""
from __future__ import annotations

from megatron_tempnet.config import ModelConfig
from megatron_tempnet.hf.common import CONCAT, COPY, QKV, VOCAB, convert_from_hf, convert_to_hf

L, H = "decoder.layers.{i}.", "model.layers.{i}."


def key_map(cfg: ModelConfig):
    rows = [
        ("embedding.word_embeddings.weight", ["model.embed_tokens.weight"], VOCAB),
        (L + "input_layernorm.weight", [H + "input_layernorm.weight"], COPY),
        (L + "self_attention.linear_qkv.weight",
         [H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight",
          H + "self_attn.v_proj.weight"], QKV),
        (L + "self_attention.linear_proj.weight", [H + "self_attn.o_proj.weight"], COPY),
        (L + "pre_mlp_layernorm.weight", [H + "post_attention_layernorm.weight"], COPY),
        (L + "mlp.linear_fc1.weight", [H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"],
         CONCAT),
        (L + "mlp.linear_fc2.weight", [H + "mlp.down_proj.weight"], COPY),
        ("decoder.final_layernorm.weight", ["model.norm.weight"], COPY),
    ]
    if not cfg.tie_embeddings:
        rows.append(("output_layer.weight", ["lm_head.weight"], VOCAB))
    return rows


def hf_config(cfg: ModelConfig, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rotary_base,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, **extra)


def from_hf(hf: dict, cfg: ModelConfig) -> dict:
    return convert_from_hf(key_map, hf, cfg)


def to_hf(full: dict, cfg: ModelConfig) -> dict:
    return convert_to_hf(key_map, full, cfg)
