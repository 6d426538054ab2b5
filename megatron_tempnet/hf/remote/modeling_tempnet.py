"""TempNet causal LMs: transformers' LLaMA / GPT-2 with the model's own per-token temperature.

Shipped verbatim as ``modeling_tempnet.py`` in every TempNet export (``auto_map`` in
config.json: ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``), beside
``configuration_tempnet.py`` and a ``tempnet_math.py`` generated from megatron_tempnet's source
(plain torch). The package (``megatron_tempnet.hf.modeling``) imports this same file, with its
own ``tempnet_math`` (megatron_tempnet's TempNet heads and solver). Per position
(docs/tempnet_math.md 5):

    logits [..., V] = lm_head(h)                               (V: the tokenizer's vocabulary)
    z      [..., V_pad] = [logits | h @ pad_logit_weight^T]    (the padded rows training saw)
    tau    = TempNet(z)  or  solve_tau(z, rho, tau_min, tau_max)   (as in training)
    returned logits = logits / tau                             (so generate() samples at tau)

TempNet (loss modes "tempnet_dro", "tempnet_ce") or, for loss mode "dro_exact", the exact tau*
with KL(p_tau || u) = rho within the tau bounds. Greedy decoding is unchanged (dividing by
tau > 0 keeps the argmax). ``return_tau=True`` adds ``tau`` to the output;
``model.use_tempnet = False`` returns the plain logits (tau = 1).

``model(input_ids, labels=labels).loss`` is the cross-entropy of the returned (tempered)
logits: mean over the positions whose label is not -100 of -log softmax(logits / tau)[label],
labels shifted as in transformers. It normalises over the V tokenizer rows (training's
tempered CE also counted the padded rows, which are never a label: a little lower).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from .configuration_tempnet import TempNetGPT2Config, TempNetLlamaConfig
from .tempnet_math import TEMPNET_LOSS_MODES, build_head, solve_tau, tempnet_config

try:  # the package's side only: an export's own files are copied by transformers
    from .tempnet_math import write_remote_code
except ImportError:
    write_remote_code = None

# the keyword arguments of forward() that transformers' causal-LM loss reads
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def auto_map(model_cls) -> dict:
    """config.json's ``auto_map`` for a TempNet model class (the files of an export)."""
    return {"AutoConfig": f"configuration_tempnet.{model_cls.config_class.__name__}",
            "AutoModelForCausalLM": f"modeling_tempnet.{model_cls.__name__}"}


class _TempNetForCausalLM:
    """Mixin over a transformers *ForCausalLM: divides its logits by the model's own tau."""

    def _init_tempnet(self, config) -> None:
        self.tempnet_config = cfg = tempnet_config(config.tempnet)
        if cfg.loss_mode in TEMPNET_LOSS_MODES:
            self.tempnet = build_head(cfg, config.padded_vocab_size)
        elif cfg.loss_mode == "dro_exact":  # tau* is solved from the logits: no weights
            self.tempnet = None
        else:
            raise ValueError(f"config.tempnet loss_mode {cfg.loss_mode!r} has no per-token tau "
                             "(export it as a plain model)")
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
        weight = self.pad_logit_weight
        pad = hidden.to(device=weight.device, dtype=weight.dtype) @ weight.t()
        z = torch.cat([logits.to(device=pad.device, dtype=pad.dtype), pad], dim=-1)  # [..., V_pad]
        if self.tempnet is None:  # "dro_exact"
            c = self.tempnet_config
            tau = solve_tau(z, c.rho, c.tau_min, c.tau_max)
        else:
            tau = self.tempnet(z)
        return tau.to(logits.device)

    def forward(self, *args, return_tau: bool = False, **kwargs):
        if args:  # positional arguments, named as the transformers class names them
            names = list(inspect.signature(super().forward).parameters)
            kwargs.update(zip(names, args))
        labels = kwargs.pop("labels", None)
        return_dict = kwargs.pop("return_dict", None)
        # no labels: the base class would take the CE of the logits at tau = 1
        out = super().forward(return_dict=True, **kwargs)
        tau = None
        if self.use_tempnet:
            tau = self.tau_from_logits(out.logits, self._lm_head_input)
            out.logits = out.logits / tau.unsqueeze(-1).to(out.logits.dtype)
            self._lm_head_input = None  # (kept with use_tempnet off: the lm_head input)
        if labels is not None:  # the CE of the logits returned
            extra = {k: kwargs[k] for k in LOSS_KWARGS if k in kwargs}
            loss = self.loss_function(logits=out.logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **extra)
            out = type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})
        if return_tau and tau is not None:
            out["tau"] = tau
        return out.to_tuple() if return_dict is False else out

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained; a model of the package also writes the standalone
        model code of an export (a model loaded from an export: transformers copies its own)."""
        if write_remote_code is not None:
            self.config.auto_map = auto_map(type(self))
        super().save_pretrained(save_directory, *args, **kwargs)
        if write_remote_code is not None:
            write_remote_code(save_directory)


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
