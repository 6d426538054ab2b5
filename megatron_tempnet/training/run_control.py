"""When a run stops (:class:`RunControl`, checked once per iteration with ONE small all-reduce
so that every rank agrees) and its exit codes:
- SIGTERM / SIGUSR1 (SLURM's preemption / ``--signal``): save, exit ``EXIT_CODE_PREEMPTED``;
- ``--exit-duration-in-mins`` elapsed: save, exit ``EXIT_CODE_TIME_LIMIT``;
- non-finite loss or gradient norm, a loss spike (``--loss-spike-factor``), or a collapse to
  uniform predictions (``--collapse-patience`` iterations at ln V after learning): raise
  :class:`TrainingDiverged` without saving (the last good checkpoint stays current);
  ``train.py`` exits ``EXIT_CODE_DIVERGED``.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_tempnet.cli import EarlySignals
from megatron_tempnet.training.checkpoint_config import CheckpointConfig
from megatron_tempnet.training.reports import LM_LOSS, ReportSpec

EXIT_CODE_PREEMPTED = 3  # SIGTERM / SIGUSR1: checkpoint saved, requeue the job
EXIT_CODE_TIME_LIMIT = 4  # --exit-duration-in-mins: checkpoint saved, requeue the job
EXIT_CODE_DIVERGED = 5  # non-finite loss / grad norm or loss spike: nothing saved, do not requeue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingDiverged(RuntimeError):
    """Non-finite loss / gradient norm, a loss spike, or a collapse to ln V; raised on every
    rank, nothing saved. ``since``: the first iteration of a collapse (checkpoints from it on
    predict uniformly)."""

    def __init__(self, message: str, since: int | None = None):
        super().__init__(message)
        self.since = since


@dataclass
class Stop:
    exit_code: int
    message: str


class RunControl:
    """Per-iteration decisions shared by all ranks: stop on a signal or time limit (save first),
    or raise :class:`TrainingDiverged` on a non-finite loss / grad norm or a loss spike.

    Use as a context manager: it installs the SIGTERM / SIGUSR1 handlers and restores the old
    ones on exit. :meth:`check` costs one all-reduce of 5 numbers over all ranks per iteration.
    """

    SPIKE_WARMUP_ITERS = 10  # iterations before the running mean is trusted
    SPIKE_EMA = 0.9
    COLLAPSE_LEARNED = 0.1  # the collapse check starts once the loss was 10% below ln V
    COLLAPSE_TOLERANCE = 0.01  # "at ln V": within 1% of it, or above

    def __init__(self, cfg: CheckpointConfig | None = None, start_time: float | None = None,
                 device="cpu", vocab_size: int | None = None,
                 losses: Sequence[str] | None = None):
        self.cfg = cfg or CheckpointConfig()
        self.bind(device, vocab_size, losses)
        self.start_time = time.time() if start_time is None else start_time
        self.signal_received: int | None = None
        self._old_handlers: dict = {}
        self._depth = 0
        self._mean_loss, self._seen = None, 0
        self._best_loss, self._uniform_since = math.inf, None

    def state_dict(self) -> dict:
        """What the loss-spike and collapse checks remember (saved with a checkpoint, so that a
        resumed job goes on counting: a run resumed from a checkpoint taken while the loss sat
        at ln V still stops after --collapse-patience iterations in all)."""
        best = self._best_loss if math.isfinite(self._best_loss) else None
        return {"mean_loss": self._mean_loss, "seen": self._seen, "best_loss": best,
                "uniform_since": self._uniform_since}

    def load_state_dict(self, state: dict) -> None:
        self._mean_loss, self._seen = state["mean_loss"], int(state["seen"])
        best = state["best_loss"]
        self._best_loss = math.inf if best is None else float(best)
        self._uniform_since = state["uniform_since"]

    def bind(self, device, vocab_size: int | None, losses: Sequence[str] | None) -> None:
        """What the checks need of the run once it is built: the device of the all-reduce, the
        vocabulary (the collapse check's ln V), the reported losses whose finiteness is checked
        (training/reports.py ``ReportSpec.losses``; the first one is the plain CE)."""
        self.device, self.vocab_size = device, vocab_size
        self.losses = ReportSpec.every_loss() if losses is None else tuple(losses)

    def __enter__(self) -> "RunControl":
        """Install the handlers (re-entrant: train.py enters before start-up, the loop again)."""
        self._depth += 1
        if self._depth == 1 and self.cfg.exit_signal_handler:
            for sig in STOP_SIGNALS:
                old = signal.signal(sig, self._on_signal)
                if isinstance(old, EarlySignals):  # the command's start-up record
                    self.signal_received = self.signal_received or old.received
                    old = signal.SIG_DFL
                self._old_handlers[sig] = old
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth:
            return
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        self.signal_received = signum

    def stop_before_training(self) -> Stop | None:
        """A SIGTERM / SIGUSR1 received during start-up (or --load): every rank agrees to stop
        before the first iteration, with the preemption exit code (nothing new to save)."""
        flag = torch.tensor([float(self.signal_received is not None)], dtype=torch.float64,
                            device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag)
        if not flag.item():
            return None
        name = (signal.Signals(self.signal_received).name if self.signal_received
                else "a signal on another rank")
        return Stop(EXIT_CODE_PREEMPTED, f"received {name} during start-up: stopping before "
                                         f"training (exit code {EXIT_CODE_PREEMPTED})")

    def check(self, iteration: int, reports: list, grad_norm) -> Stop | None:
        """After an iteration's optimizer step: agree with every rank on what happens next."""
        losses = [r[k][0] for r in reports for k in self.losses if k in r]
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        bad = (~torch.isfinite(torch.stack(losses))).any().double() if losses else zero
        ce = torch.stack([r[LM_LOSS] for r in reports]).double().sum(0) if reports else None
        bad_norm = grad_norm is not None and not math.isfinite(grad_norm)
        minutes = (time.time() - self.start_time) / 60
        over_time = (self.cfg.exit_duration_in_mins is not None
                     and minutes >= self.cfg.exit_duration_in_mins)
        # [non-finite, signal, time limit, lm loss sum, token count], summed over all ranks
        # (reports exist on the last pipeline stage only; TP replicas count both sum and tokens)
        flags = torch.stack([bad + bad_norm, zero + (self.signal_received is not None),
                             zero + over_time, *(ce if ce is not None else (zero, zero))])
        if dist.is_initialized():
            dist.all_reduce(flags)
        bad, signalled, over_time, loss_sum, loss_count = flags.tolist()
        loss = loss_sum / loss_count if loss_count else float("nan")
        if bad:
            raise TrainingDiverged(
                f"iteration {iteration}: non-finite training numbers (lm loss {loss:.4g}, grad "
                f"norm {grad_norm}): stopping without saving a checkpoint")
        self._check_spike(iteration, loss)
        self._check_collapse(iteration, loss)
        if signalled:
            name = (signal.Signals(self.signal_received).name if self.signal_received
                    else "a signal on another rank")
            return Stop(EXIT_CODE_PREEMPTED, f"iteration {iteration}: received {name}: "
                                             f"stopping (exit code {EXIT_CODE_PREEMPTED})")
        if over_time:
            return Stop(EXIT_CODE_TIME_LIMIT,
                        f"iteration {iteration}: --exit-duration-in-mins "
                        f"{self.cfg.exit_duration_in_mins} reached: stopping (exit code "
                        f"{EXIT_CODE_TIME_LIMIT})")
        return None

    def _check_spike(self, iteration: int, loss: float) -> None:
        factor = self.cfg.loss_spike_factor
        if factor is None or not math.isfinite(loss):
            return
        if self._seen >= self.SPIKE_WARMUP_ITERS and loss > factor * self._mean_loss:
            raise TrainingDiverged(
                f"iteration {iteration}: lm loss {loss:.4f} > --loss-spike-factor {factor} x "
                f"running mean {self._mean_loss:.4f}: stopping without saving a checkpoint")
        self._mean_loss = loss if self._mean_loss is None else (
            self.SPIKE_EMA * self._mean_loss + (1 - self.SPIKE_EMA) * loss)
        self._seen += 1

    def _check_collapse(self, iteration: int, loss: float) -> None:
        """The plateau at ln V: a model that learned (loss 10% below ln V) and then sits at
        ln V (uniform predictions: what a NaN guard's "last good" checkpoint may already do)
        for --collapse-patience iterations."""
        patience, vocab = self.cfg.collapse_patience, self.vocab_size
        if not patience or not vocab or vocab < 2 or not math.isfinite(loss):
            return
        ln_v = math.log(vocab)
        self._best_loss = min(self._best_loss, loss)
        if self._best_loss > (1 - self.COLLAPSE_LEARNED) * ln_v:
            return  # not learned yet: the start of a run from scratch sits at ln V too
        if loss < (1 - self.COLLAPSE_TOLERANCE) * ln_v:
            self._uniform_since = None
            return
        self._uniform_since = self._uniform_since or iteration
        if iteration - self._uniform_since + 1 >= patience:
            raise TrainingDiverged(
                f"iteration {iteration}: lm loss {loss:.4f} has sat at ln V = {ln_v:.4f} "
                f"(uniform predictions over the vocabulary of {vocab}) since iteration "
                f"{self._uniform_since}, after reaching {self._best_loss:.4f}: the model "
                f"collapsed (--collapse-patience {patience}; 0 turns the check off); stopping "
                "without saving a checkpoint", since=self._uniform_since)
