"""Write a Hugging Face model directory from a full (TP=1, PP=1) megatron-core state dict.

Without TempNet the result is a plain ``LlamaForCausalLM`` / ``GPT2LMHeadModel``; with TempNet
weights (``tempnet.*`` keys), or for loss_mode "dro_exact" (whose own tau is the exact tau*
solved from the logits), it is a ``TempNetLlamaForCausalLM`` / ``TempNetGPT2ForCausalLM``
(megatron_tempnet/hf/modeling.py), whose config carries TempNet's settings and loss mode. The
vocabulary padding is removed from the LM's weights; the padded output rows travel as
``pad_logit_weight`` because the tau's input is the padded logits vector of training.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from megatron_tempnet.config import ModelConfig
from megatron_tempnet.hf import family_module
from megatron_tempnet.tempnet.config import TempNetConfig

TEMPNET_PREFIX = "tempnet."


def _output_rows(full: dict, cfg: ModelConfig) -> torch.Tensor:
    key = "embedding.word_embeddings.weight" if cfg.tie_embeddings else "output_layer.weight"
    return full[key]


def build_hf_model(full: dict, cfg: ModelConfig, tempnet_cfg: TempNetConfig | None = None):
    """A transformers model holding the weights of ``full`` (float32)."""
    from megatron_tempnet.hf import modeling

    conv = family_module(cfg.family)
    hf_state = conv.to_hf(full, cfg)
    base_config = conv.hf_config(cfg)
    has_tempnet = any(k.startswith(TEMPNET_PREFIX) for k in full)
    if has_tempnet and tempnet_cfg is None:
        raise ValueError("the state dict holds TempNet weights: pass its TempNetConfig")
    if has_tempnet or modeling.has_own_tau(tempnet_cfg):
        config_cls, model_cls = {
            "llama": (modeling.TempNetLlamaConfig, modeling.TempNetLlamaForCausalLM),
            "gpt": (modeling.TempNetGPT2Config, modeling.TempNetGPT2ForCausalLM)}[cfg.family]
        config = config_cls(tempnet=modeling.tempnet_settings(tempnet_cfg),
                            padded_vocab_size=cfg.padded_vocab_size(), **_plain(base_config))
        hf_state.update({k: v for k, v in full.items() if k.startswith(TEMPNET_PREFIX)})
        hf_state["pad_logit_weight"] = _output_rows(full, cfg)[cfg.vocab_size:]
    else:
        from transformers import GPT2LMHeadModel, LlamaForCausalLM

        config, model_cls = base_config, {"llama": LlamaForCausalLM,
                                          "gpt": GPT2LMHeadModel}[cfg.family]
    model = model_cls(config).eval()
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise KeyError(f"weights do not fit {model_cls.__name__}: missing "
                       f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    return model


def _plain(config) -> dict:
    d = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        d.pop(key, None)
    return d


def export_hf(out_dir: str, full: dict, cfg: ModelConfig, tempnet_cfg: TempNetConfig | None = None,
              tokenizer_file: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Save config.json, model.safetensors (sharded if large), generation_config.json and the
    tokenizer file into ``out_dir``; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_hf_model(full, cfg, tempnet_cfg).to(dtype)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    if tokenizer_file:
        save_tokenizer(tokenizer_file, out)
    return out


def save_tokenizer(tokenizer_file: str, out: Path) -> None:
    """Copy a SentencePiece ``.model`` (as tokenizer.model) or tokenizers JSON (tokenizer.json)."""
    src = Path(tokenizer_file)
    if not src.exists():
        raise FileNotFoundError(f"tokenizer file {src} does not exist")
    name = "tokenizer.json" if src.suffix == ".json" else "tokenizer.model"
    shutil.copyfile(src, out / name)
