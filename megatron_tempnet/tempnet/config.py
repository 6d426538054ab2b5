"""TempNetConfig: the ONE home of rho, the tau bounds, M and TempNet's optimizer settings.

docs/tempnet_math.md sections 1 and 2.6 (one name, one home). This dataclass travels
through the head (``TempNetHead``), the loss (``dro_loss`` takes ``config.rho``), checkpoints and
exported configs. ``loss_mode`` chooses the loss (every loss is a value of this one field) and
``training_mode`` which parameters train (docs/tempnet_math.md 2.6, the paper's three modes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_tempnet.config import ConfigError

INPUT_CONVENTIONS = ("raw", "max_shifted")
# TempNet designs (``--tempnet-arch``): "paper" (default) is the authors' head, reproduced exactly
# (tempnet/head.py TempNetHead); "scale_aware" reads the logits' scale and shape and starts at
# tau0 with no floor (tempnet/head.py ScaleAwareTempNetHead; why: docs/tempnet_design.md).
ARCHS = ("paper", "scale_aware")
# The defaults that differ between the designs (a field left at None takes its design's value).
ARCH_DEFAULTS = {"paper": {"dropout": 0.5, "lr": 2e-6},
                 "scale_aware": {"dropout": 0.0, "lr": 1e-3}}
LR_SCHEDULES = ("constant", "lm")
# "ce": plain megatron GPTModel, vocab-parallel CE (TempNet off); "dro_fixed_tau": the DRO loss
# with a constant tau (ablation, no TempNet); "tempnet_dro": TempNet's tau + the DRO loss;
# "dro_exact": the DRO loss at its exact per-token tau* (no TempNet: the paper's "DRO without
# TempNet", tempnet/exact_tau.py); "tempnet_ce": TempNet's tau + the tempered CE(z/tau, y) (the
# paper's "TempNet without DRO").
LOSS_MODES = ("ce", "dro_fixed_tau", "tempnet_dro", "dro_exact", "tempnet_ce")
# The loss modes whose model carries a TempNet head (and so can train it with the LM frozen).
TEMPNET_LOSS_MODES = ("tempnet_dro", "tempnet_ce")
# The loss modes whose tau depends on rho (the DRO loss at a learned or exact tau; with a fixed
# tau rho only shifts the loss by a constant, and "tempnet_ce" does not use it).
RHO_LOSS_MODES = ("tempnet_dro", "dro_exact")
# rho / log V of the paper's GPT-2 run (rho 8.0, vocabulary 50257): the suggested rho ratio.
PAPER_RHO_RATIO = 8.0 / math.log(50257)
# "scratch": LM + TempNet from random init; "finetune": a pretrained LM (loaded from a
# checkpoint) + TempNet, both trained; "frozen_lm": only TempNet trains (LM requires_grad=False).
TRAINING_MODES = ("scratch", "finetune", "frozen_lm")
# Implementations of the DRO loss (tempnet/loss.py dispatches): "reference" (torch ops), "fused"
# (Triton streaming kernel on the logits shard), "fused_linear" (output projection + TempNet +
# loss in token chunks; the logits never exist whole); "auto": fused on CUDA with Triton, else
# reference.
DRO_LOSS_IMPLS = ("auto", "reference", "fused", "fused_linear")


@dataclass
class TempNetConfig:
    """TempNet and DRO-loss hyperparameters (docs/tempnet_math.md sections 1-2).

    Their flags carry a ``--tempnet-`` prefix (``--dro-loss-impl`` excepted).

    Attributes:
        rho: KL radius of the DRO loss; TempNet is pushed toward the tau at which the
            tempered entropy H(p_tau) equals log V - rho (docs/tempnet_math.md 1.5).
        tau_min: lower bound of tau = tau_min + (tau_max - tau_min) * sigmoid(o). The
            default bounds are the paper's GPT-2 run ([0.5, 5.0], rho 8.0); LLaMA used
            [0.01, 2.0], rho 8.5-10.
        tau_max: upper bound of tau (see tau_min).
        arch: the TempNet design: "paper" (the authors' TempNet, exactly) or "scale_aware"
            (features that carry the logits' scale and shape, tau in log space starting at
            tau0; see ``ARCHS`` and docs/tempnet_design.md).
        tau0: scale_aware only: tau of every token at initialisation; must lie strictly
            inside (tau_min, tau_max). None (``initial_tau``): 1 (the geometric mean of the
            bounds when they exclude 1), and with training_mode "frozen_lm" the trainer starts
            TempNet at the frozen LM's best global temperature on its first training batches
            instead (train.py ``calibrate_initial_tau``).
        hidden_size: M, the width of W1 (M x V) and W2 (M x M) (scale_aware: of its hidden
            layer).
        dropout: dropout probability after the first hidden layer (None: the design's
            default, ``ARCH_DEFAULTS``: 0.5 for "paper", as upstream; 0 for "scale_aware").
        input_convention: TempNet's input x from the logits z (paper design only). "raw":
            x = z / max(||z||_2, 1e-12), the upstream authors' convention (F.normalize of the
            raw logits), one all-reduce under TP. "max_shifted": x = (z - max z) /
            max(||z - max z||_2, 1e-12), invariant to adding a constant to the logits like the
            softmax, one extra all-reduce(max). Training, evaluation, export and generation
            all use the head, so one convention holds.
        lr: learning rate of TempNet's own optimizer parameter group (None: the design's
            default, ``ARCH_DEFAULTS``: 2e-6 for "paper" (upstream: 2e-6 jointly from
            scratch, 1e-4 to 2e-4 with the LM frozen); 1e-3 for "scale_aware").
        weight_decay: weight decay of TempNet's own parameter group (all its parameters).
        lr_schedule: "constant" (as upstream): TempNet's group keeps lr; "lm": it follows the
            LM's scheduler, scaled so that its peak is lr.
        loss_mode: the loss. "ce": plain GPTModel, TempNet off. "dro_fixed_tau": the DRO
            loss with tau = fixed_tau, no TempNet. "tempnet_dro": TempNet predicts tau per
            token, DRO loss. "dro_exact": no TempNet, the paper's "DRO without TempNet": per
            token, tau* in [tau_min, tau_max] solves KL(p_tau || u) = rho on the detached
            logits, or is the bound where no root lies inside; the loss is the DRO loss at
            tau*, i.e. the dual value min over tau of l(z, y, tau), with its exact gradient
            (tempnet/exact_tau.py); evaluation and the exported model use tau* as the model's
            own tau. "tempnet_ce": TempNet's tau per token, loss = CE(z / tau, y), the paper's
            "TempNet without DRO" (rho is not used by the loss).
        fixed_tau: the constant tau of "dro_fixed_tau" (tau = 1 gives CE + rho - log V).
        training_mode: which parameters train (docs/tempnet_math.md 2.6, the paper's three
            modes): "scratch" (LM and TempNet from random init), "finetune" (a pretrained LM
            loaded from a checkpoint, and TempNet, both trained) or "frozen_lm" (only TempNet
            trains, so it needs a loss mode with TempNet, ``TEMPNET_LOSS_MODES``:
            "tempnet_dro" or "tempnet_ce").
        dro_loss_impl: implementation of the DRO loss (``DRO_LOSS_IMPLS``); every one
            computes the same math (tempnet/loss.py): "reference" (torch ops), "fused"
            (Triton streaming kernel on the logits shard), "fused_linear" (output projection,
            TempNet and loss in token chunks; the logits never exist whole), "auto" (fused on
            CUDA with Triton, else reference).
    """

    rho: float = 8.0
    tau_min: float = 0.5
    tau_max: float = 5.0
    arch: str = "paper"
    tau0: float | None = None
    hidden_size: int = 256
    dropout: float | None = None
    input_convention: str = "raw"
    lr: float | None = None
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    loss_mode: str = "ce"
    fixed_tau: float = 1.0
    training_mode: str = "scratch"
    dro_loss_impl: str = "auto"

    def __post_init__(self) -> None:
        # a field left at None takes its design's default (an unknown arch: validate() says so)
        for name, value in ARCH_DEFAULTS.get(self.arch, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self, vocab_size: int | None = None) -> "TempNetConfig":
        """Raise ConfigError naming the field (and its flag), the value and the fix.
        ``vocab_size`` (the tokenizer's, when known): also check rho against log V."""
        def bad(field: str, why: str) -> ConfigError:
            flag = "--tempnet-" + field.replace("_", "-")
            return ConfigError(f"TempNetConfig.{field} ({flag}) = {getattr(self, field)!r}: {why}")

        if self.arch not in ARCHS:
            raise bad("arch", f"unknown TempNet design; choose one of {ARCHS}")

        for field in ("rho", "tau_min", "tau_max", "dropout", "lr", "weight_decay", "fixed_tau"):
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
        if self.arch == "paper" and self.tau0 is not None:
            raise bad("tau0", "only --tempnet-arch scale_aware has a chosen initial tau (the "
                              "paper's head starts at the midpoint of the bounds); drop "
                              "--tempnet-tau0 or add --tempnet-arch scale_aware")
        if self.arch == "scale_aware" and self.tau0 is not None:
            tau0 = self.tau0
            if isinstance(tau0, bool) or not isinstance(tau0, (int, float)) \
                    or not math.isfinite(tau0) or not self.tau_min < tau0 < self.tau_max:
                raise bad("tau0", f"must lie strictly inside the tau bounds ({self.tau_min!r}, "
                                  f"{self.tau_max!r}) so that tau can move both ways; "
                                  "change --tempnet-tau0 or the bounds")
        if self.arch == "scale_aware" and self.input_convention != "raw":
            raise bad("input_convention", "applies to --tempnet-arch paper only; "
                                          "scale_aware always centres the logits (it is "
                                          "shift-invariant): drop the flag")
        if self.lr < 0:
            raise bad("lr", "must be >= 0")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"choose one of {LR_SCHEDULES}")
        if self.loss_mode not in LOSS_MODES:
            raise bad("loss_mode", f"choose one of {LOSS_MODES}")
        if self.fixed_tau <= 0:
            raise bad("fixed_tau", "must be > 0 (tau divides the logits)")
        if self.dro_loss_impl not in DRO_LOSS_IMPLS:
            raise ConfigError(f"TempNetConfig.dro_loss_impl (--dro-loss-impl) = "
                              f"{self.dro_loss_impl!r}: choose one of {DRO_LOSS_IMPLS}")
        if self.training_mode not in TRAINING_MODES:
            raise bad("training_mode", f"choose one of {TRAINING_MODES}")
        if self.training_mode == "frozen_lm" and not self.uses_tempnet:
            raise bad("training_mode", "frozen_lm trains TempNet only: it needs "
                                       "--tempnet-loss-mode tempnet_dro or tempnet_ce "
                                       f"(got {self.loss_mode!r}, which has nothing to train)")
        if vocab_size is not None and self.loss_mode in RHO_LOSS_MODES \
                and self.rho >= math.log(vocab_size):
            # KL(p || u) = log V - H(p) < log V: dl/dtau = rho - KL > 0, so tau -> tau_min
            log_v = math.log(vocab_size)
            raise ConfigError(
                f"--tempnet-rho {self.rho!r} >= log V = {log_v:.2f} (vocabulary {vocab_size}): "
                "the DRO constraint KL(p || uniform) <= log V never binds, so tau sits at "
                f"--tempnet-tau-min {self.tau_min!r}: choose rho < {log_v:.2f} (e.g. "
                f"{PAPER_RHO_RATIO * log_v:.1f}, the paper's rho / log V = 8.0 / log 50257)")
        return self

    @property
    def tau_range(self) -> tuple[float, float] | None:
        """(tau_min, tau_max), the range of the model's per-token tau (the tau histograms' bins);
        None for loss_mode "ce", which has no tau."""
        return None if self.loss_mode == "ce" else (self.tau_min, self.tau_max)

    @property
    def initial_tau(self) -> float:
        """The scale_aware head's tau at init: ``tau0``, or (None) 1 when inside the bounds,
        else their geometric mean."""
        if self.tau0 is not None:
            return float(self.tau0)
        return 1.0 if self.tau_min < 1.0 < self.tau_max else math.sqrt(self.tau_min * self.tau_max)

    @property
    def uses_tempnet(self) -> bool:
        """Whether the model carries a TempNet head (``TEMPNET_LOSS_MODES``)."""
        return self.loss_mode in TEMPNET_LOSS_MODES
