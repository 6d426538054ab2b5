"""Metrics sinks: console line, TensorBoard scalars and tau histograms, a JSONL metrics file.

One rank writes (:func:`is_writer_rank`: last pipeline stage, tp_rank 0, dp_rank 0: the rank that
holds the DP-reduced metrics); every other rank gets a no-op logger, so callers need no rank
checks. Configuration: ``training.config.LoggingConfig`` (the ``logging`` section).

What a training iteration logs (``MetricsLogger.log_train``; keys as the loop's metrics dict,
tags ``train/<key>`` with spaces -> underscores): lr, lm loss (plain CE, tau = 1) and its ppl,
dro loss, tempered ce, tau mean/min/max, grad norm, tokens/s, TFLOP/s/GPU, MFU, memory
(training/flops.py); in fp16 the loss scale and the skipped iterations of the log window; with a
tau (every loss mode but "ce") the histogram ``train/tau`` of the per-token tau of every token
the loss kept over the log window (every iteration since the previous log line, not only the
logged one), in ``--tau-histogram-bins`` equal-width bins over TempNetConfig's [tau_min,
tau_max] (values outside in the edge bins), from :func:`tau_histogram` in
``step.masked_sum_loss``. An evaluation (``log_eval``): ``valid/<key>`` for every scalar of
``training.evaluate.evaluate``'s dict, and the histogram of TempNet's per-token tau over the
validation set (``valid/tau``, fixed bins over [tau_min, tau_max]).

JSONL: one object per call, ``{"split": "train" | "valid", "iteration": N, <key>: value, ...}``
(non-finite floats as the strings "nan" / "inf" / "-inf", so every line is strict JSON). A
train line's ``"tau histogram"`` is the list of counts (token counts, loss-mask weighted: ints
for 0/1 masks); its bin edges, ``"tau histogram edges"`` (bins + 1 floats), are written on the
first train line of each logger (each job appending to the file) and again only if they change.
A valid line's ``"tau histogram"`` is ``{"edges": [...], "counts": [...]}``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_tempnet.training.config import LoggingConfig


def is_writer_rank(ctx) -> bool:
    """The rank that writes metrics: last pipeline stage, first TP and DP rank."""
    return ctx.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0


def tag(key: str) -> str:
    """A TensorBoard tag from a metrics key: "lm loss" -> "lm_loss", "TFLOP/s/GPU" kept."""
    return key.strip().replace(" ", "_").replace("=", "_")


def _json_value(value):
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _scalars(metrics: dict) -> dict:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def tau_histogram(tau: torch.Tensor, loss_mask: torch.Tensor, tau_min: float, tau_max: float,
                  bins: int = 32) -> torch.Tensor:
    """Fixed-bin counts [bins] of the masked per-token tau over [tau_min, tau_max] (a cheap,
    summable report: add it over micro-batches and DP ranks like the other sums)."""
    idx = ((tau.detach().reshape(-1).double() - tau_min) / (tau_max - tau_min) * bins)
    idx = idx.floor().long().clamp_(0, bins - 1)
    weight = loss_mask.reshape(-1).to(torch.float64)
    return torch.zeros(bins, dtype=torch.float64, device=tau.device).index_add_(0, idx, weight)


def tau_histogram_edges(tau_min: float, tau_max: float, bins: int) -> list[float]:
    """The bins + 1 edges of ``tau_histogram``'s equal-width bins."""
    return torch.linspace(tau_min, tau_max, bins + 1, dtype=torch.float64).tolist()


def format_train_line(iteration: int, train_iters: int, metrics: dict) -> str:
    """One console line from a train metrics dict (the keys of ``log_train``), in a fixed order;
    keys absent from ``metrics`` are left out."""
    fmt = [("lr", "lr {:.3e}"), ("lm loss", "lm loss {:.4f}"), ("ppl", "ppl {:.2f}"),
           ("dro loss", "dro loss {:.4f}"), ("tempered ce", "tempered ce {:.4f}"),
           ("tau", "tau {:.3f}"), ("tau std", "± {:.3f}"), ("tau min", "[{:.3f},"),
           ("tau max", "{:.3f}]"),
           ("grad norm", "grad norm {:.3f}"), ("tokens/s", "tokens/s {:,.0f}"),
           ("TFLOP/s/GPU", "{:.2f} TFLOP/s/GPU"), ("MFU", "MFU {:.1%}"),
           ("ms/iter", "{:.1f} ms/iter"), ("mem max allocated GiB", "mem {:.2f} GiB"),
           ("mem rss GiB", "rss {:.2f} GiB"), ("loss scale", "loss scale {:.1f}"),
           ("skipped iterations", "skipped {:.0f}"), ("eta s", "ETA {}")]
    parts = [f"iteration {iteration:6d}/{train_iters}"]
    for key, pattern in fmt:
        if key in metrics and metrics[key] is not None:
            value = float(metrics[key])
            piece = pattern.format(format_duration(value) if key == "eta s" else value)
            if parts and ((key == "tau max" and parts[-1].startswith("["))
                          or (key == "tau std" and parts[-1].startswith("tau "))):
                parts[-1] += " " + piece  # "tau 1.000 ± 0.100 | [0.500, 5.000]"
            else:
                parts.append(piece)
    return " | ".join(parts)


class MetricsLogger:
    """TensorBoard + JSONL sinks of one run; a no-op on every rank but the writer rank.

    Use as a context manager or call ``close()``. ``log_train(iteration, metrics)`` and
    ``log_eval(iteration, eval_metrics)`` write scalars (and the tau histogram) and a JSONL line.
    """

    def __init__(self, config: LoggingConfig | None, ctx=None, *, writer: bool | None = None):
        self.config = (config or LoggingConfig()).validate()
        self.active = is_writer_rank(ctx) if writer is None else writer
        self._tb = None
        self._jsonl = None
        self._train_edges = None  # the tau histogram edges last written to a train JSONL line
        if not self.active:
            return
        if self.config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=self.config.tensorboard_dir)
        if self.config.metrics_jsonl:
            path = Path(self.config.metrics_jsonl)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = path.open("a", encoding="utf-8")

    # --- sinks -----------------------------------------------------------------------------
    def log_scalars(self, iteration: int, metrics: dict, prefix: str) -> None:
        if self._tb is not None:
            for key, value in _scalars(metrics).items():
                self._tb.add_scalar(f"{prefix}/{tag(key)}", value, iteration)

    def log_histogram(self, iteration: int, name: str, counts, edges) -> None:
        """A histogram from fixed-bin ``counts`` [B] and ``edges`` [B + 1]."""
        if self._tb is None:
            return
        counts = torch.as_tensor(counts, dtype=torch.float64)
        edges = torch.as_tensor(edges, dtype=torch.float64)
        total = float(counts.sum())
        if total <= 0:
            return
        centers = (edges[:-1] + edges[1:]) / 2
        mean = float((counts * centers).sum()) / total
        nonzero = torch.nonzero(counts).flatten()
        self._tb.add_histogram_raw(
            name, min=float(edges[nonzero[0]]), max=float(edges[nonzero[-1] + 1]),
            num=total, sum=mean * total, sum_squares=float((counts * centers ** 2).sum()),
            bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(),
            global_step=iteration)

    def write_jsonl(self, record: dict) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_json_value(record), sort_keys=False) + "\n")
            self._jsonl.flush()

    # --- what the loop calls ---------------------------------------------------------------
    def log_config(self, config: dict) -> None:
        """The resolved run configuration: a JSONL line ``{"split": "config", ...}`` and a
        TensorBoard text (one run's hyperparameters, with its metrics)."""
        if not self.active:
            return
        if self._tb is not None:
            self._tb.add_text("config", "```\n" + json.dumps(_json_value(config), indent=1)
                              + "\n```", 0)
        self.write_jsonl({"split": "config", **config})
        self.flush()

    def log_train(self, iteration: int, metrics: dict) -> None:
        """One logged training iteration: ``train/*`` scalars, the ``train/tau`` histogram
        (``metrics["tau histogram"]``: {"edges", "counts"}) and a JSONL line (counts; the edges
        once, see the module docstring)."""
        if not self.active:
            return
        self.log_scalars(iteration, metrics, "train")
        record = {"split": "train", "iteration": iteration, **metrics}
        hist = record.pop("tau histogram", None)
        if hist:
            self.log_histogram(iteration, "train/tau", hist["counts"], hist["edges"])
            edges = [float(e) for e in hist["edges"]]
            record["tau histogram"] = [int(c) if float(c).is_integer() else float(c)
                                       for c in hist["counts"]]
            if edges != self._train_edges:
                record["tau histogram edges"] = self._train_edges = edges
        self.write_jsonl(record)
        self.flush()

    def log_eval(self, iteration: int, metrics: dict, split: str = "valid") -> None:
        """An evaluation (``training.evaluate.evaluate``'s dict): scalars, the tau histogram,
        and a JSONL line (the temperature grid included)."""
        if not self.active or metrics is None:
            return
        self.log_scalars(iteration, metrics, split)
        hist = metrics.get("tau histogram")
        if hist:
            self.log_histogram(iteration, f"{split}/tau", hist["counts"], hist["edges"])
        self.write_jsonl({"split": split, "iteration": iteration, **metrics})
        self.flush()

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Throughput:
    """What a log line needs beyond the step's numbers: model FLOPs per token (0: no TFLOP/s)
    and the device's peak FLOP/s (None: no MFU; training/flops.py)."""

    flops_per_token: float = 0.0
    peak: float | None = None


def train_metrics(reduced: dict, *, lr: float, grad_norm, elapsed_s: float, iterations: int,
                  tokens_per_iteration: int, flops_per_token: float, world_size: int,
                  peak: float | None, device, remaining_iterations: int | None = None) -> dict:
    """The full train metrics dict of one logged iteration from the loop's pieces.

    reduced: the loop's logged metrics (``step.global_metrics(...)`` as floats: "lm loss", and
    with the DRO loss "dro loss", "tempered ce", "tau", "tau std", "tau min", "tau max"; in
    fp16 "loss scale", "skipped iterations"; "tau histogram" {"edges", "counts"}, passed on as
    it is); adds lr, ppl, grad norm, tokens/s, TFLOP/s/GPU (with FLOPs per token), MFU (with a
    peak), ms/iter, memory (training/flops.py) and, given the iterations still to run, "eta s"
    at this window's pace.
    """
    from megatron_tempnet.training.flops import memory_metrics, throughput_metrics

    out = {"lr": float(lr), **{k: v if isinstance(v, dict) else float(v)
                               for k, v in reduced.items()}}
    if "lm loss" in out:
        out["ppl"] = math.exp(min(out["lm loss"], 30.0))
    if grad_norm is not None:
        out["grad norm"] = float(grad_norm)
    elapsed_s = max(elapsed_s, 1e-9)
    tokens_per_s = tokens_per_iteration * iterations / elapsed_s
    out.update(throughput_metrics(tokens_per_s, flops_per_token, world_size, peak)
               if flops_per_token else {"tokens/s": float(tokens_per_s)})
    out["ms/iter"] = 1000.0 * elapsed_s / max(iterations, 1)
    out.update(memory_metrics(device))
    if remaining_iterations is not None:
        out["eta s"] = out["ms/iter"] / 1000.0 * max(remaining_iterations, 0)
    return out


def format_duration(seconds: float) -> str:
    """"1d 02:03:04", "02:03:04", "03:04" (minutes:seconds under an hour)."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = (f"{hours:02d}:{minutes:02d}:{secs:02d}" if hours or days
             else f"{minutes:02d}:{secs:02d}")
    return f"{days}d {clock}" if days else clock


def default_paths(root: str | os.PathLike) -> LoggingConfig:
    """A LoggingConfig writing ``root/tensorboard`` and ``root/metrics.jsonl``."""
    root = Path(root)
    return LoggingConfig(tensorboard_dir=str(root / "tensorboard"),
                         metrics_jsonl=str(root / "metrics.jsonl"))


class MetricsCallback:
    """Train-loop callback ``fn(state, step_output)`` (loop.train's ``callbacks``): whenever the
    loop has just logged this iteration, write its metrics record (``state.metrics[-1]``, built
    once by the loop: ``train_metrics``) to the sinks, as it is. No collective of its own."""

    def __init__(self, logger: MetricsLogger):
        self.logger = logger

    def __call__(self, state, out) -> None:
        if state.metrics and state.metrics[-1][0] == state.iteration:
            self.logger.log_train(state.iteration, state.metrics[-1][1])
