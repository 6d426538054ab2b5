"""Checkpointing and run-control settings (``--save``, ``--load``, ``--exit-duration-in-mins``,
...): a light module (dataclasses and megatron_tempnet.config only, no torch or megatron-core), so
that ``arguments.py`` can build and validate them before anything heavy is imported."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_tempnet.config import ConfigError


@dataclass
class CheckpointConfig:
    """Checkpointing and run control; flags keep Megatron-LM's names (--save, --load, ...).

    Attributes:
        save: directory the checkpoints are written to (None: none are saved).
        load: directory to resume from (None: start from scratch). Often the same as save:
            a requeued job resumes from its own checkpoints; with no checkpoint there yet it
            starts from scratch.
        save_interval: save every N iterations (None: only at the end and when stopped
            early).
        keep_last: keep the newest k checkpoints (None: keep all).
        exit_duration_in_mins: save and exit (EXIT_CODE_TIME_LIMIT) once this much time has
            passed.
        exit_signal_handler: SIGTERM / SIGUSR1 save and exit (EXIT_CODE_PREEMPTED).
        finetune: load model weights only (TempNet may be absent: it keeps its init); reset
            iteration, optimizer, scheduler and data position.
        no_load_optim: resume without the optimizer and scheduler state (a fresh optimizer;
            the lr schedule continues at the loaded iteration).
        no_load_rng: resume without the RNG states.
        loss_spike_factor: stop (like a NaN) when the loss exceeds factor x its running mean
            (None: off).
        collapse_patience: stop (like a NaN) when the lm loss, after having dropped below
            ln V, sits at ln V (uniform predictions) for this many iterations (0: off).
        override_opt_param_scheduler: on a resume whose lr / weight-decay schedule flags
            differ from the checkpoint's, use this run's values (Adam moments kept). With
            neither of Megatron-LM's pair, the difference is an error naming both.
        use_checkpoint_opt_param_scheduler: on such a resume, use the checkpoint's schedule.
        no_checkpoint_checksums: neither record checksums at save nor verify them at load.
        no_save_lock: do not lock --save (for a filesystem without POSIX record locks, which
            the lock names when it fails); nothing then stops a second run writing there.
    """

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    keep_last: int | None = None
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = True
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    loss_spike_factor: float | None = None
    collapse_patience: int = 20
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    no_checkpoint_checksums: bool = False
    no_save_lock: bool = False

    def validate(self) -> "CheckpointConfig":
        for name in ("save_interval", "keep_last"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: must be an integer "
                                  ">= 1 (or left out)")
        if self.save_interval is not None and not self.save:
            raise ConfigError(f"--save-interval {self.save_interval} needs --save DIR "
                              "(where to write the checkpoints)")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ConfigError(f"--exit-duration-in-mins {self.exit_duration_in_mins!r}: must "
                              "be > 0 (or left out)")
        if self.loss_spike_factor is not None and not self.loss_spike_factor > 1:
            raise ConfigError(f"--loss-spike-factor {self.loss_spike_factor!r}: must be > 1 "
                              "(e.g. 3: stop when the loss triples its running mean)")
        if not isinstance(self.collapse_patience, int) or self.collapse_patience < 0:
            raise ConfigError(f"--collapse-patience {self.collapse_patience!r}: must be an "
                              "integer >= 0 (iterations at ln V before stopping; 0: off)")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ConfigError("--override-opt-param-scheduler and "
                              "--use-checkpoint-opt-param-scheduler contradict each other: "
                              "choose this run's schedule or the checkpoint's")
        if self.finetune and not self.load:
            raise ConfigError("--finetune needs --load CHECKPOINT (the weights to start from); "
                              "without it the run would train from random weights")
        return self
