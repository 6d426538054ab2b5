"""Configurations of the TempNet causal LMs (megatron-tempnet's Hugging Face export).

Shipped verbatim as ``configuration_tempnet.py`` in every TempNet export (``auto_map`` in
config.json, ``trust_remote_code=True``); it needs only transformers. The package itself
(``megatron_tempnet.hf.modeling``) imports this same file. A config is a LlamaConfig /
GPT2Config plus:

    tempnet            TempNet's settings (TempNetConfig fields: arch, hidden_size, tau bounds,
                       rho, input_convention, tau0, loss_mode, which picks the tau)
    padded_vocab_size  the vocabulary of training (Megatron pads it; TempNet reads those rows)
"""
from __future__ import annotations

import warnings

import transformers
from transformers import GPT2Config, LlamaConfig

# The transformers versions this code supports (requirements.txt and README.md of an export say
# so too; another version gets a warning, not an error), and the versions it was tested with
# (tests/unit/test_hf_remote_code.py; TEMPNET_EXTRA_TRANSFORMERS runs it with a second one).
TESTED_TRANSFORMERS = ("4.57", "6")  # >= first, < second
TESTED_TORCH = ("2.4", "3")  # transformers' own floor
TESTED_WITH = "torch 2.13.0 with transformers 4.57.6 and 5.25.0"


def _version_tuple(text: str) -> tuple:
    parts = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_transformers_version(version: str | None = None) -> bool:
    """Warn (once per process) when transformers is outside TESTED_TRANSFORMERS."""
    version = version or transformers.__version__
    low, high = TESTED_TRANSFORMERS
    ok = _version_tuple(low) <= _version_tuple(version) < _version_tuple(high)
    if not ok:
        warnings.warn(f"TempNet model code was tested with transformers >={low},<{high}; "
                      f"this is {version}", stacklevel=2)
    return ok


class _TempNetConfigMixin:
    def _init_tempnet_fields(self, tempnet, padded_vocab_size) -> None:
        self.tempnet = dict(tempnet or {})  # missing fields: TempNetConfig's defaults
        self.padded_vocab_size = int(padded_vocab_size or self.vocab_size)


class TempNetLlamaConfig(_TempNetConfigMixin, LlamaConfig):
    model_type = "tempnet_llama"

    def __init__(self, tempnet: dict | None = None, padded_vocab_size: int | None = None, **kw):
        super().__init__(**kw)
        self._init_tempnet_fields(tempnet, padded_vocab_size)


class TempNetGPT2Config(_TempNetConfigMixin, GPT2Config):
    model_type = "tempnet_gpt2"

    def __init__(self, tempnet: dict | None = None, padded_vocab_size: int | None = None, **kw):
        super().__init__(**kw)
        self._init_tempnet_fields(tempnet, padded_vocab_size)


check_transformers_version()
