"""What a model's per-token output means and how it is reported: one :class:`ReportSpec`, built
from the run's TempNetConfig and the channels the model declares, handed to the training step,
the loop's log line, run control, the evaluator and the run summary.

A model returns per-token values with labels: [b, s] (plain GPTModel: the CE) or [b, s, K] with
K named channels (``models.tempnet_gpt.LOSS_CHANNELS``: loss, ce, tempered_ce, tau; only
"loss" carries gradient). Each channel is reported under a name (``CHANNEL_REPORTS``); "lm loss"
is always the plain CE (tau = 1), so that it stays comparable across loss modes.

Reductions of a report over micro-batches and data-parallel ranks (``reduction``):
``"mean"`` [sum, token count] pairs, ``"min"`` / ``"max"`` the masked extremes of tau, ``"sum"``
the tau histogram's counts [bins] and the float64 moments of tau [sum w, sum w tau, sum w
tau^2] (``TAU_MOMENTS``, turned into "tau std").
"""
from __future__ import annotations

from dataclasses import dataclass

# channel the model returns -> the report (log line, TensorBoard, JSONL) it feeds
CHANNEL_REPORTS = {"loss": "dro loss", "ce": "lm loss", "tempered_ce": "tempered ce",
                   "tau": "tau"}
LM_LOSS = CHANNEL_REPORTS["ce"]
TAU_HISTOGRAM = "tau histogram"
TAU_MOMENTS = "tau moments"
REPORT_EXTREMES = {"tau min": "min", "tau max": "max"}
REPORT_COUNTS = (TAU_HISTOGRAM,)  # summed as they are (a [bins] vector), not divided by tokens


@dataclass(frozen=True)
class ReportSpec:
    """channels: the model's per-token channel names in order (() for a plain [b, s] CE);
    tau_bounds: (tau_min, tau_max) of the tau histogram (None: no tau, no histogram);
    histogram_bins: its equal-width bins over the bounds (EvalConfig.tau_histogram_bins,
    ``--tau-histogram-bins``: training and evaluation histograms share it)."""

    channels: tuple[str, ...] = ()
    tau_bounds: tuple[float, float] | None = None
    histogram_bins: int = 32

    @classmethod
    def build(cls, tempnet_cfg, channels: tuple[str, ...], histogram_bins: int) -> "ReportSpec":
        """The spec of a model with ``channels`` trained with ``tempnet_cfg`` (None: plain)."""
        bounds = tempnet_cfg.tau_range if tempnet_cfg is not None and channels else None
        return cls(tuple(channels), bounds, histogram_bins)

    def __post_init__(self):
        unknown = [c for c in self.channels if c not in CHANNEL_REPORTS]
        if unknown:
            raise ValueError(f"loss channels {unknown} have no report name (CHANNEL_REPORTS)")

    @property
    def has_tau(self) -> bool:
        return "tau" in self.channels

    @property
    def losses(self) -> tuple[str, ...]:
        """The reported losses (plain CE first): run control stops when one is non-finite, the
        run summary prints them."""
        names = [self.report_name(c) for c in self.channels if c != "tau"] or [LM_LOSS]
        return tuple(sorted(names, key=lambda n: n != LM_LOSS))

    @classmethod
    def every_loss(cls) -> tuple[str, ...]:
        """The losses any model may report (run control's default)."""
        return cls(tuple(CHANNEL_REPORTS)).losses

    @staticmethod
    def report_name(channel: str) -> str:
        return CHANNEL_REPORTS[channel]

    @staticmethod
    def reduction(key: str) -> str:
        """How report ``key`` combines over micro-batches and ranks: mean | min | max | sum."""
        return REPORT_EXTREMES.get(key) or ("sum" if key in (*REPORT_COUNTS, TAU_MOMENTS)
                                            else "mean")
