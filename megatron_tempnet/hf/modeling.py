"""Hugging Face model classes that apply TempNet's per-token temperature (docs/tempnet_math.md 5).

``TempNetLlamaForCausalLM`` / ``TempNetGPT2ForCausalLM`` are the transformers classes with the
model's own per-token tau of training on top: the TempNet head (the same
:class:`~megatron_tempnet.tempnet.head.TempNetHead`, at TP=1; loss modes "tempnet_dro",
"tempnet_ce") or, for a model trained with loss_mode "dro_exact" (no TempNet), the exact tau* of
:func:`~megatron_tempnet.tempnet.exact_tau.solve_tau` (KL(p_tau || u) = rho within the tau bounds,
computed at every step from the padded logits, as in training). Per position:

    logits [..., V] = lm_head(h)                               (V: the tokenizer's vocabulary)
    z      [..., V_pad] = [logits | h @ pad_logit_weight^T]    (the padded rows training saw)
    tau    = TempNetHead(z)  or  solve_tau(z, rho, tau_min, tau_max)   (as in training)
    returned logits = logits / tau                             (so generate() samples at tau)

Greedy decoding is unchanged (dividing by tau > 0 keeps the argmax). ``return_tau=True`` adds
``tau`` to the output; ``model.use_tempnet = False`` returns the plain logits (for a fixed
temperature). The config carries TempNet's settings (M, tau bounds, rho, input convention and
the training loss mode, which picks the tau) in ``config.tempnet`` and the padded vocabulary
size in ``config.padded_vocab_size``; exports without "loss_mode" have a TempNet head.
Importing this module registers the classes with transformers' Auto classes.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

from megatron_tempnet.tempnet.config import TempNetConfig
from megatron_tempnet.tempnet.exact_tau import solve_tau
from megatron_tempnet.tempnet.head import build_tempnet_head

# The TempNetConfig fields an exported model carries (the ones that define its tau).
EXPORTED_TEMPNET_FIELDS = ("arch", "tau0", "hidden_size", "tau_min", "tau_max", "rho",
                           "input_convention", "loss_mode")


def has_own_tau(cfg: TempNetConfig | None) -> bool:
    """Whether a model trained with ``cfg`` exports with its own per-token tau (a TempNet head
    or the exact tau* of "dro_exact"); "ce" and "dro_fixed_tau" export plain models."""
    return cfg is not None and (cfg.uses_tempnet or cfg.loss_mode == "dro_exact")


def tempnet_settings(cfg: TempNetConfig) -> dict:
    return {k: getattr(cfg, k) for k in EXPORTED_TEMPNET_FIELDS}


def _tempnet_config(settings: dict) -> TempNetConfig:
    """The TempNetConfig of the exported tau (loss_mode "tempnet_dro" when the export has none:
    older exports all had a TempNet head; arch "paper" when it has none: older exports all had
    the paper's head); dropout off."""
    names = {f.name for f in dataclasses.fields(TempNetConfig)}
    kept = {k: v for k, v in settings.items() if k in names}
    kept.setdefault("loss_mode", "tempnet_dro")
    return TempNetConfig(**kept, dropout=0.0).validate()


class TempNetLlamaConfig(LlamaConfig):
    model_type = "tempnet_llama"

    def __init__(self, tempnet: dict | None = None, padded_vocab_size: int | None = None, **kw):
        super().__init__(**kw)
        self.tempnet = tempnet or tempnet_settings(TempNetConfig(loss_mode="tempnet_dro"))
        self.padded_vocab_size = padded_vocab_size or self.vocab_size


class TempNetGPT2Config(GPT2Config):
    model_type = "tempnet_gpt2"

    def __init__(self, tempnet: dict | None = None, padded_vocab_size: int | None = None, **kw):
        super().__init__(**kw)
        self.tempnet = tempnet or tempnet_settings(TempNetConfig(loss_mode="tempnet_dro"))
        self.padded_vocab_size = padded_vocab_size or self.vocab_size


class _TempNetForCausalLM:
    """Mixin over a transformers *ForCausalLM: divides its logits by the model's own tau
    (TempNet's, or the exact tau* of "dro_exact")."""

    def _init_tempnet(self, config) -> None:
        self.tempnet_config = cfg = _tempnet_config(config.tempnet)
        if not has_own_tau(cfg):
            raise ValueError(f"config.tempnet loss_mode {cfg.loss_mode!r} has no per-token tau "
                             "to export (export it as a plain model)")
        # "dro_exact": tau* is solved from the logits, there are no TempNet weights
        self.tempnet = (build_tempnet_head(cfg, config.padded_vocab_size) if cfg.uses_tempnet
                        else None)
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
        z = torch.cat([logits.to(pad.dtype), pad], dim=-1)  # [..., V_pad]
        if self.tempnet is None:  # "dro_exact"
            c = self.tempnet_config
            return solve_tau(z, c.rho, c.tau_min, c.tau_max)
        return self.tempnet(z)

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
