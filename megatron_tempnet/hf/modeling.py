"""Hugging Face model classes that apply TempNet's per-token temperature (docs/tempnet_math.md 5).

``TempNetLlamaForCausalLM`` / ``TempNetGPT2ForCausalLM`` are the transformers classes with the
model's own per-token tau of training on top: TempNet's (loss modes "tempnet_dro",
"tempnet_ce") or, for loss mode "dro_exact", the exact tau* of
:func:`~megatron_tempnet.tempnet.exact_tau.solve_tau`. Their code is
``megatron_tempnet/hf/remote/`` (configuration_tempnet.py, modeling_tempnet.py: the formulas are
in modeling_tempnet.py's docstring), the same files every TempNet export ships for
``trust_remote_code=True`` (hf/remote_code.py); here the tau comes from the package's own
TempNet heads and solver (hf/remote/tempnet_math.py), in an export from a standalone
tempnet_math.py generated from the package's source. ``return_tau=True`` adds ``tau`` to the
output; ``model.use_tempnet = False`` returns the plain logits; ``.loss`` with labels is the
CE of the tempered logits returned. The config carries TempNet's settings in
``config.tempnet`` and the padded vocabulary size in ``config.padded_vocab_size``.
Importing this module registers the classes with transformers' Auto classes.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from megatron_tempnet.hf.remote.configuration_tempnet import TempNetGPT2Config, TempNetLlamaConfig
from megatron_tempnet.hf.remote.modeling_tempnet import (TempNetGPT2ForCausalLM,
                                                         TempNetLlamaForCausalLM, auto_map)
from megatron_tempnet.hf.remote_code import EXPORTED_TEMPNET_FIELDS
from megatron_tempnet.tempnet.config import TempNetConfig

__all__ = ["EXPORTED_TEMPNET_FIELDS", "TempNetGPT2Config", "TempNetGPT2ForCausalLM",
           "TempNetLlamaConfig", "TempNetLlamaForCausalLM", "auto_map", "has_own_tau",
           "register_auto_classes", "tempnet_settings"]


def has_own_tau(cfg: TempNetConfig | None) -> bool:
    """Whether a model trained with ``cfg`` exports with its own per-token tau (a TempNet head
    or the exact tau* of "dro_exact"); "ce" and "dro_fixed_tau" export plain models."""
    return cfg is not None and (cfg.uses_tempnet or cfg.loss_mode == "dro_exact")


def tempnet_settings(cfg: TempNetConfig) -> dict:
    return {k: getattr(cfg, k) for k in EXPORTED_TEMPNET_FIELDS}


def register_auto_classes() -> None:
    for config_cls, model_cls in ((TempNetLlamaConfig, TempNetLlamaForCausalLM),
                                  (TempNetGPT2Config, TempNetGPT2ForCausalLM)):
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:  # already registered
            pass


register_auto_classes()
