"""The tau of the TempNet causal LMs, the package's side: megatron_tempnet's own TempNet heads
(tempnet/head.py, at TP=1) and exact-tau solver (tempnet/exact_tau.py).

An export does not ship this file: megatron_tempnet/hf/remote_code.py writes a standalone
``tempnet_math.py`` in its place, generated from the package's source (plain torch, no
megatron-core), with the same names: ``TEMPNET_LOSS_MODES``, ``tempnet_config(settings)``,
``build_head(config, padded_vocab_size)``, ``solve_tau(z, rho, tau_min, tau_max)``; this side
adds ``write_remote_code(directory)``, which writes those files.
"""
from __future__ import annotations

import dataclasses

from megatron_tempnet.tempnet.config import TEMPNET_LOSS_MODES, TempNetConfig
from megatron_tempnet.tempnet.exact_tau import solve_tau
from megatron_tempnet.tempnet.head import build_tempnet_head

__all__ = ["TEMPNET_LOSS_MODES", "build_head", "solve_tau", "tempnet_config",
           "write_remote_code"]


def tempnet_config(settings: dict) -> TempNetConfig:
    """The TempNetConfig of an exported tau (config.json "tempnet"): loss_mode "tempnet_dro"
    when the export has none (older exports all had a TempNet head), arch "paper" when it has
    none (older exports all had the paper's head); dropout off."""
    names = {f.name for f in dataclasses.fields(TempNetConfig)}
    kept = {k: v for k, v in settings.items() if k in names and k != "dropout"}
    kept.setdefault("loss_mode", "tempnet_dro")
    return TempNetConfig(**kept, dropout=0.0).validate()


def build_head(config: TempNetConfig, padded_vocab_size: int):
    return build_tempnet_head(config, padded_vocab_size)


def write_remote_code(directory) -> list:
    """Write the standalone model code of an export into ``directory``."""
    from megatron_tempnet.hf.remote_code import write_remote_code as write

    return write(directory)
