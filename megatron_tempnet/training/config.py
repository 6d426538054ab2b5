"""The configuration sections of evaluation, metrics logging and DeepSpeed: light (no torch,
no megatron-core at import), so that the argument parser reads them without the heavy modules
that use them (training/evaluate.py, training/metrics_log.py, training/deepspeed.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from megatron_tempnet.config import ConfigError


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
    """

    eval_interval: int = 0
    eval_iters: int = 10
    temperature_min: float = 0.05
    temperature_max: float = 20.0
    temperature_points: int = 25
    refine_points: int = 16
    ece_bins: int = 15
    tau_histogram_bins: int = 32

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
        for name in ("temperature_min", "temperature_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if not 0 < self.temperature_min < self.temperature_max:
            raise bad("temperature_min", f"need 0 < temperature_min < temperature_max "
                                         f"({self.temperature_max!r})")
        if self.temperature_points == 1:
            raise bad("temperature_points", "use 0 (only T = 1) or >= 2 grid points")
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
