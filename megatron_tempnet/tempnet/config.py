"""TempNetConfig: the ONE home of rho, the tau bounds, M and TempNet's optimizer settings.

tempnet.md sections 1 and 2; style.md practice 7 (one name, one home). This dataclass travels
through the head (``TempNetHead``), the loss (``dro_loss`` takes ``config.rho``), checkpoints and
exported configs. ``loss_mode`` is deliberately not here yet (issue 9 adds it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_tempnet.config import ConfigError

INPUT_CONVENTIONS = ("raw", "max_shifted")
LR_SCHEDULES = ("constant", "lm")


@dataclass
class TempNetConfig:
    """TempNet and DRO-loss hyperparameters (tempnet.md sections 1-2).

    rho:          KL radius of the DRO loss; TempNet is pushed toward the tau at which the
                  tempered entropy H(p_tau) equals log V - rho (tempnet.md section 1).
    tau_min, tau_max: bounds of tau = tau_min + (tau_max - tau_min) * sigmoid(o). Defaults are
                  the paper's GPT-2 run ([0.5, 5.0], rho 8.0); LLaMA used [0.01, 2.0], rho 8.5-10.
    hidden_size:  M, the width of W1 (M x V) and W2 (M x M).
    dropout:      dropout probability after sigmoid(W1 x + b1) (paper: 0.5).
    input_convention:
        "raw"         (default) x = z / max(||z||_2, 1e-12): the upstream authors' convention
                      (F.normalize of the raw logits) and one all-reduce under TP.
        "max_shifted" x = (z - max z) / max(||z - max z||_2, 1e-12): invariant to adding a
                      constant to the logits, like the softmax; one extra all-reduce(max).
        Training, evaluation, export and generation all use the head, so one convention holds.
    lr, weight_decay: TempNet's own optimizer parameter group (upstream: 2e-6 jointly from
                  scratch; 1e-4 to 2e-4 with the LM frozen).
    lr_schedule:  "constant" (default, as upstream): TempNet's group keeps ``lr``;
                  "lm": it follows the LM's scheduler, scaled so that its peak is ``lr``.
    """

    rho: float = 8.0
    tau_min: float = 0.5
    tau_max: float = 5.0
    hidden_size: int = 256
    dropout: float = 0.5
    input_convention: str = "raw"
    lr: float = 2e-6
    weight_decay: float = 0.0
    lr_schedule: str = "constant"

    def validate(self) -> "TempNetConfig":
        """Raise ConfigError naming the field (and its flag), the value and the fix."""
        def bad(field: str, why: str) -> ConfigError:
            flag = "--tempnet-" + field.replace("_", "-")
            return ConfigError(f"TempNetConfig.{field} ({flag}) = {getattr(self, field)!r}: {why}")

        for field in ("rho", "tau_min", "tau_max", "dropout", "lr", "weight_decay"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise bad(field, "must be a finite number")
        if not isinstance(self.hidden_size, int) or isinstance(self.hidden_size, bool):
            raise bad("hidden_size", "must be an integer")
        if self.rho < 0:
            raise bad("rho", "the KL radius must be >= 0 (the paper uses 8.0 to 10)")
        if self.tau_min <= 0:
            raise bad("tau_min", "must be > 0 (tau divides the logits)")
        if self.tau_min >= self.tau_max:
            raise bad("tau_min", f"must be < tau_max ({self.tau_max!r}); "
                                 "raise --tempnet-tau-max or lower --tempnet-tau-min")
        if self.hidden_size <= 0:
            raise bad("hidden_size", "M must be > 0 (the paper uses 256)")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must satisfy 0 <= dropout < 1 (the paper uses 0.5)")
        if self.input_convention not in INPUT_CONVENTIONS:
            raise bad("input_convention", f"choose one of {INPUT_CONVENTIONS}")
        if self.lr < 0:
            raise bad("lr", "must be >= 0")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"choose one of {LR_SCHEDULES}")
        return self
