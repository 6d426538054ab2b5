"""Write a Hugging Face model directory from a full (TP=1, PP=1) megatron-core state dict.

Without TempNet the result is a plain ``LlamaForCausalLM`` / ``GPT2LMHeadModel``; with TempNet
weights (``tempnet.*`` keys), or for loss_mode "dro_exact" (whose own tau is the exact tau*
solved from the logits), it is a ``TempNetLlamaForCausalLM`` / ``TempNetGPT2ForCausalLM``
(megatron_tempnet/hf/modeling.py), whose config carries TempNet's settings and loss mode, and
the directory carries the model code (``auto_map``, hf/remote_code.py: torch and transformers
only). The vocabulary padding is removed from the LM's weights; the padded output rows travel
as ``pad_logit_weight`` because the tau's input is the padded logits vector of training.

Beside the weights: the tokenizer (hf/tokenizer.py: a fast tokenizer with training's ids), its
special ids in config.json and generation_config.json, a generation config that samples at
temperature 1 (so the model's own tau is the temperature of plain ``generate()``), a model
card (README.md, hf/model_card.py) and, for TempNet models, requirements.txt.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_tempnet.config import ModelConfig
from megatron_tempnet.hf import family_module
from megatron_tempnet.tempnet.config import TempNetConfig

TEMPNET_PREFIX = "tempnet."


def output_key(cfg: ModelConfig) -> str:
    """The key of the output layer's rows in a full megatron state dict."""
    return "embedding.word_embeddings.weight" if cfg.tie_embeddings else "output_layer.weight"


def _output_rows(full: dict, cfg: ModelConfig) -> torch.Tensor:
    return full[output_key(cfg)]


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


# generate() without arguments samples from softmax(returned logits): the model's own tau for a
# TempNet model, temperature 1 for a plain one (no top-k / top-p truncation)
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def export_hf(out_dir: str, full: dict, cfg: ModelConfig, tempnet_cfg: TempNetConfig | None = None,
              tokenizer_file: str | None = None, dtype: torch.dtype = torch.float32,
              card: dict | None = None) -> Path:
    """Save config.json, model.safetensors (sharded if large), generation_config.json, the
    tokenizer files, README.md and (TempNet) the model code into ``out_dir``; returns the
    directory. ``card``: what the model card tells beyond the model (hf/model_card.py)."""
    from transformers import GenerationConfig

    from megatron_tempnet.hf.model_card import model_card
    from megatron_tempnet.hf.remote.configuration_tempnet import TESTED_TORCH, TESTED_TRANSFORMERS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_hf_model(full, cfg, tempnet_cfg).to(dtype)
    # without a tokenizer the special ids are unknown (not the transformers class defaults)
    special = dict.fromkeys(SPECIAL_IDS)
    if tokenizer_file:
        from megatron_tempnet.hf.tokenizer import export_tokenizer

        special = export_tokenizer(tokenizer_file, out, cfg.max_position_embeddings)
    for key, value in special.items():
        setattr(model.config, key, value)
    model.generation_config = GenerationConfig(**GENERATION_DEFAULTS, **special)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    _add_legacy_config_keys(out / "config.json")
    custom = hasattr(model, "use_tempnet")
    if custom:
        (out / "requirements.txt").write_text(
            f"torch>={TESTED_TORCH[0]},<{TESTED_TORCH[1]}\n"
            f"transformers>={TESTED_TRANSFORMERS[0]},<{TESTED_TRANSFORMERS[1]}\n")
    (out / "README.md").write_text(model_card(model, cfg, tempnet_cfg if custom else None,
                                              dict(card or {}, dtype=dtype,
                                                   tokenizer=tokenizer_file)),
                                   encoding="utf-8")
    return out


def _add_legacy_config_keys(path: Path) -> None:
    """transformers 4.x reads LLaMA's rotary base from "rope_theta" (5.x from
    "rope_parameters", and accepts both): write both."""
    import json

    config = json.loads(path.read_text(encoding="utf-8"))
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
