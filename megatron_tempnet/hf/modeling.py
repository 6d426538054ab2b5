"""Hugging Face model classes that apply TempNet's per-token temperature (tempnet.md section 5).

``TempNetLlamaForCausalLM`` / ``TempNetGPT2ForCausalLM`` are the transformers classes with the
TempNet head of training (the same :class:`~megatron_tempnet.tempnet.head.TempNetHead`, at TP=1)
on top. Per position:

    logits [..., V] = lm_head(h)                               (V: the tokenizer's vocabulary)
    z      [..., V_pad] = [logits | h @ pad_logit_weight^T]    (the padded rows training saw)
    tau    = TempNetHead(z)                                    (same convention as training)
    returned logits = logits / tau                             (so generate() samples at tau)

Greedy decoding is unchanged (dividing by tau > 0 keeps the argmax). ``return_tau=True`` adds
``tau`` to the output; ``model.use_tempnet = False`` returns the plain logits (for a fixed
temperature). The config carries TempNet's settings (M, tau bounds, rho, input convention) in
``config.tempnet`` and the padded vocabulary size in ``config.padded_vocab_size``.
Importing this module registers the classes with transformers' Auto classes.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

from megatron_tempnet.tempnet.config import TempNetConfig
from megatron_tempnet.tempnet.head import TempNetHead

# The TempNetConfig fields an exported model carries (the ones that define its tau).
EXPORTED_TEMPNET_FIELDS = ("hidden_size", "tau_min", "tau_max", "rho", "input_convention")


def tempnet_settings(cfg: TempNetConfig) -> dict:
    return {k: getattr(cfg, k) for k in EXPORTED_TEMPNET_FIELDS}


def _tempnet_config(settings: dict) -> TempNetConfig:
    names = {f.name for f in dataclasses.fields(TempNetConfig)}
    return TempNetConfig(**{k: v for k, v in settings.items() if k in names},
                         dropout=0.0, loss_mode="tempnet_dro")


class TempNetLlamaConfig(LlamaConfig):
    model_type = "tempnet_llama"

    def __init__(self, tempnet: dict | None = None, padded_vocab_size: int | None = None, **kw):
        super().__init__(**kw)
        self.tempnet = tempnet or tempnet_settings(TempNetConfig())
        self.padded_vocab_size = padded_vocab_size or self.vocab_size


class TempNetGPT2Config(GPT2Config):
    model_type = "tempnet_gpt2"

    def __init__(self, tempnet: dict | None = None, padded_vocab_size: int | None = None, **kw):
        super().__init__(**kw)
        self.tempnet = tempnet or tempnet_settings(TempNetConfig())
        self.padded_vocab_size = padded_vocab_size or self.vocab_size


class _TempNetForCausalLM:
    """Mixin over a transformers *ForCausalLM: divides its logits by TempNet's tau."""

    def _init_tempnet(self, config) -> None:
        self.tempnet = TempNetHead(_tempnet_config(config.tempnet), config.padded_vocab_size)
        hidden = self.get_output_embeddings().weight.shape[1]
        pad_rows = config.padded_vocab_size - config.vocab_size
        self.pad_logit_weight = nn.Parameter(torch.zeros(pad_rows, hidden))
        self.use_tempnet = True
        self._lm_head_input = None
        self.get_output_embeddings().register_forward_hook(self._keep_lm_head_input)

    def _keep_lm_head_input(self, module, args, output):
        self._lm_head_input = args[0]

    def tau_from_logits(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """tau [...] from the unpadded logits [..., V] and the lm_head input [..., h]."""
        pad = hidden.to(self.pad_logit_weight.dtype) @ self.pad_logit_weight.t()
        return self.tempnet(torch.cat([logits.to(pad.dtype), pad], dim=-1))

    def forward(self, *args, return_tau: bool = False, **kwargs):
        out = super().forward(*args, **kwargs)
        if not self.use_tempnet:
            return out
        tau = self.tau_from_logits(out.logits, self._lm_head_input)
        self._lm_head_input = None
        out.logits = (out.logits / tau.unsqueeze(-1).to(out.logits.dtype))
        if return_tau:
            out["tau"] = tau
        return out


class TempNetLlamaForCausalLM(_TempNetForCausalLM, LlamaForCausalLM):
    config_class = TempNetLlamaConfig

    def __init__(self, config: TempNetLlamaConfig):
        super().__init__(config)
        self._init_tempnet(config)


class TempNetGPT2ForCausalLM(_TempNetForCausalLM, GPT2LMHeadModel):
    config_class = TempNetGPT2Config

    def __init__(self, config: TempNetGPT2Config):
        super().__init__(config)
        self._init_tempnet(config)


def register_auto_classes() -> None:
    for config_cls, model_cls in ((TempNetLlamaConfig, TempNetLlamaForCausalLM),
                                  (TempNetGPT2Config, TempNetGPT2ForCausalLM)):
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:  # already registered
            pass


register_auto_classes()
