"""The configuration sections of evaluation, metrics logging and DeepSpeed: light (no torch,
no megatron-core at import), so that the argument parser reads them without the heavy modules
that use them (training/evaluate.py, training/metrics_log.py, training/deepspeed.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_tempnet.config import ConfigError

# The temperature tools beside TempNet (tempnet/temperature_tools.py; docs/tempnet_math.md 5.1),
# in evaluation's column order: metric name ("ppl <name>", "ece <name>") -> the EvalConfig
# fields that set it (tools/generate.py's flags of the same names).
TEMPERATURE_TOOLS = {
    "entropy T": ("entropy_temperature_base", "entropy_temperature_alpha"),
    "threshold T": ("confidence_threshold", "confident_temperature", "uncertain_temperature"),
    "ensemble": ("ensemble_temperatures",),
}


@dataclass
class EvalConfig:
    """Evaluation settings (one home: their flags are generated from these fields).

    Attributes:
        eval_interval: evaluate every this many iterations (0: only at the end of training).
        eval_iters: global batches per evaluation (each ``num_microbatches`` micro-batches).
        temperature_min: lowest global temperature of pass 1's coarse log-spaced grid.
        temperature_max: highest global temperature of pass 1's coarse log-spaced grid.
        temperature_points: temperatures in pass 1's coarse log-spaced grid (0: none; T = 1
            and the fixed tau are always added).
        refine_points: log-spaced temperatures of pass 2 between the best coarse point's
            neighbours (0: no second pass; the best T is a coarse grid point).
        ece_bins: equal-width confidence bins of the ECE.
        tau_histogram_bins: bins of the histograms of the model's own per-token tau over
            [tau_min, tau_max] (TempNet or exact tau only): evaluation's and the training
            log's (training/reports.py ReportSpec).
        entropy_temperature_base: the entropy-adaptive temperature T = base x (1 + alpha x
            H(p)/log V) per token, H the entropy of softmax(z) at T = 1 over the logits' V
            entries: its base (an untuned default; docs/tempnet_math.md 5.1).
        entropy_temperature_alpha: the entropy-adaptive temperature's slope alpha (> -1, so
            that T > 0 for every entropy; an untuned default).
        ensemble_temperatures: the multi-temperature ensemble's temperatures T_k (at least 2,
            each > 0): its distribution is the mean of softmax(z / T_k) (untuned defaults).
        confidence_threshold: confidence thresholding: a token whose max softmax probability
            at T = 1 is >= this value (in (0, 1)) is sampled at confident_temperature, any
            other at uncertain_temperature.
        confident_temperature: confidence thresholding's temperature of the confident tokens
            (> 0; greedy-when-confident decoding is its limit 0, whose NLL is infinite on a
            wrong token; an untuned default).
        uncertain_temperature: confidence thresholding's temperature of the other tokens
            (> 0; an untuned default).
    """

    eval_interval: int = 0
    eval_iters: int = 10
    temperature_min: float = 0.05
    temperature_max: float = 20.0
    temperature_points: int = 25
    refine_points: int = 16
    ece_bins: int = 15
    tau_histogram_bins: int = 32
    entropy_temperature_base: float = 1.0
    entropy_temperature_alpha: float = 1.0
    ensemble_temperatures: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    confidence_threshold: float = 0.5
    confident_temperature: float = 0.8
    uncertain_temperature: float = 1.5

    def validate(self) -> "EvalConfig":
        def bad(name, why):
            return ConfigError(f"EvalConfig.{name} (--{name.replace('_', '-')}) = "
                               f"{getattr(self, name)!r}: {why}")
        for name in ("eval_interval", "eval_iters", "temperature_points", "refine_points",
                     "ece_bins", "tau_histogram_bins"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(name, "must be an integer >= 0")
        if self.ece_bins < 1 or self.tau_histogram_bins < 1:
            raise bad("ece_bins" if self.ece_bins < 1 else "tau_histogram_bins", "must be >= 1")
        for name in ("temperature_min", "temperature_max", "entropy_temperature_base",
                     "entropy_temperature_alpha", "confidence_threshold",
                     "confident_temperature", "uncertain_temperature"):
            if not _finite_number(getattr(self, name)):
                raise bad(name, "must be a finite number")
        if not 0 < self.temperature_min < self.temperature_max:
            raise bad("temperature_min", f"need 0 < temperature_min < temperature_max "
                                         f"({self.temperature_max!r})")
        if self.temperature_points == 1:
            raise bad("temperature_points", "use 0 (only T = 1) or >= 2 grid points")
        for name in ("entropy_temperature_base", "confident_temperature",
                     "uncertain_temperature"):
            if getattr(self, name) <= 0:
                raise bad(name, "a temperature must be > 0 (e.g. 1.0; the limit 0 is greedy "
                                "decoding, whose NLL is infinite on a wrong token)")
        if self.entropy_temperature_alpha <= -1:
            raise bad("entropy_temperature_alpha", "must be > -1, so that T = base x (1 + alpha x "
                                                   "H/log V) stays > 0 for H/log V in [0, 1]; "
                                                   "e.g. 1.0")
        if not 0 < self.confidence_threshold < 1:
            raise bad("confidence_threshold", "must lie in (0, 1) (a max softmax probability), "
                                              "e.g. 0.5")
        temps = self.ensemble_temperatures
        if not isinstance(temps, (list, tuple)) or len(temps) < 2 \
                or not all(_finite_number(t) and t > 0 for t in temps):
            raise bad("ensemble_temperatures", "give at least 2 temperatures, each > 0, e.g. "
                                               "--ensemble-temperatures 0.5 1 2")
        return self

    def coarse_grid(self, extra=()) -> list[float]:
        """Sorted coarse temperatures: the log-spaced grid, T = 1 and ``extra`` (e.g. fixed tau)."""
        import torch

        grid = set()
        if self.temperature_points:
            grid.update(torch.logspace(math.log10(self.temperature_min),
                                       math.log10(self.temperature_max),
                                       self.temperature_points, dtype=torch.float64).tolist())
        grid.update([1.0, *[float(t) for t in extra]])
        return sorted(grid)


def _finite_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) \
        and math.isfinite(value)


@dataclass
class LoggingConfig:
    """Where metrics go (the console line is always printed by the train loop).

    Attributes:
        tensorboard_dir: TensorBoard event directory (None: no TensorBoard). Needs the
            ``tensorboard`` package.
        metrics_jsonl: path of the JSONL metrics file, appended to (None: none).
        peak_tflops: peak dense TFLOP/s of one device for MFU (None: the table in
            training/flops.py for the GPU; no MFU on CPU).
    """

    tensorboard_dir: str | None = None
    metrics_jsonl: str | None = None
    peak_tflops: float | None = None

    def validate(self) -> "LoggingConfig":
        if self.peak_tflops is not None and not (isinstance(self.peak_tflops, (int, float))
                                                 and self.peak_tflops > 0):
            raise ConfigError(f"--peak-tflops {self.peak_tflops!r}: must be a number > 0 "
                              "(e.g. 989 for an H100 in bf16) or left out")
        if self.tensorboard_dir is not None:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError(f"--tensorboard-dir {self.tensorboard_dir}: the tensorboard "
                                  "package is not installed (pip install tensorboard)") from None
        return self


@dataclass
class DeepSpeedConfig:
    """DeepSpeed's engine instead of megatron-core's DDP and optimizer (training/deepspeed.py).

    Attributes:
        deepspeed: train with DeepSpeed's ZeRO-1/2 engine around the same megatron-core model
            (pipeline parallelism 1 only; needs deepspeed_config).
        deepspeed_config: DeepSpeed's JSON config file (e.g. configs/deepspeed/zero1.json);
            its flag keeps DeepSpeed's and Megatron-DeepSpeed's spelling, --deepspeed_config.
    """

    deepspeed: bool = False
    deepspeed_config: str | None = None

    def validate(self) -> "DeepSpeedConfig":
        if self.deepspeed and not self.deepspeed_config:
            raise ConfigError("--deepspeed needs --deepspeed_config <file.json> "
                              "(e.g. configs/deepspeed/zero1.json)")
        if self.deepspeed_config and not self.deepspeed:
            raise ConfigError(f"--deepspeed_config {self.deepspeed_config} is given without "
                              "--deepspeed: add --deepspeed to train with DeepSpeed, or drop "
                              "--deepspeed_config")
        if self.deepspeed_config and not Path(self.deepspeed_config).is_file():
            raise ConfigError(f"--deepspeed_config {self.deepspeed_config}: no such file")
        return self
