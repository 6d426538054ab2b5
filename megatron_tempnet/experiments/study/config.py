"""The study's settings and its grid: :class:`StudyConfig`, one run :class:`Cell`, which (loss
mode, rho, TempNet design, training mode, seed) cells and CE base models a study runs, and the
default rho."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_tempnet.config import ConfigError
from megatron_tempnet.tempnet.config import ARCHS, LOSS_MODES, TRAINING_MODES, TempNetConfig

# Loss modes whose training does not depend on rho: plain CE; the DRO loss at a fixed tau
# (rho only adds the constant (rho - log V) * tau, docs/tempnet_math.md 1.7); TempNet trained
# with CE(z/tau) (no DRO term). Every other mode (tempnet_dro, dro_exact, any new DRO mode) is
# swept over rho.
RHO_FREE_LOSS_MODES = ("ce", "dro_fixed_tau", "tempnet_ce")
BASE_LOSS_MODE, BASE_TRAINING_MODE = "ce", "scratch"


def mode_uses_rho(loss_mode: str) -> bool:
    return loss_mode not in RHO_FREE_LOSS_MODES


def mode_supported(loss_mode: str, training_mode: str) -> bool:
    """Whether the trainer accepts this pair (TempNetConfig.validate decides, not this file)."""
    try:
        TempNetConfig(loss_mode=loss_mode, training_mode=training_mode).validate()
    except ConfigError:
        return False
    return True


@dataclass
class StudyConfig:
    """Everything one study runs with (``tools/study.py`` maps its flags onto these fields).

    data_path:       Megatron dataset prefixes (--data-path of the trainer).
    split:           train,valid,test document weights; validation curves come from the valid
                     split, the optional final test evaluation from the test split.
    loss_modes, rhos, training_modes, seeds: the grid axes (rhos: only for rho modes).
    archs:           the TempNet designs the TempNet loss modes run with (``ARCHS``).
    tempnet_lr:      TempNet's lr: one number for every design, or {arch: lr}.
    train_iters:     iterations of every grid cell; base_iters: of the CE base model (None:
                     train_iters, so the base is the grid's ce/scratch cell).
    eval_interval, eval_iters: validation evaluation during training (the curves; the last
                     one, at the final iteration, is the table's unless test_eval_iters > 0).
    test_eval_iters: > 0: evaluate the final checkpoint on the test split with that many global
                     batches (``python -m megatron_tempnet.evaluate``); 0: no extra evaluation.
    nproc:           processes per cell (> 1: torchrun --standalone; pass the parallel layout
                     in extra_args, e.g. --tensor-model-parallel-size 2).
    extra_args:      more training flags, appended to every cell's training (and evaluation)
                     command.
    cell_timeout_s:  kill a cell after this many seconds (None: no limit).
    """

    data_path: list[str]
    tokenizer_model: str
    out: str
    model: str = "tiny-gpt"
    tokenizer_type: str = "sentencepiece"
    split: str = "90,5,5"
    loss_modes: tuple = LOSS_MODES
    archs: tuple = ARCHS
    rhos: tuple = (8.0,)
    training_modes: tuple = TRAINING_MODES
    seeds: tuple = (1, 2, 3)
    train_iters: int = 100
    base_iters: int | None = None
    seq_length: int = 128
    micro_batch_size: int = 8
    global_batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: int = 10
    tempnet_lr: float | dict = 1e-3
    fixed_tau: float | None = None
    log_interval: int = 10
    eval_interval: int = 20
    eval_iters: int = 4
    test_eval_iters: int = 0
    nproc: int = 1
    extra_args: list[str] = field(default_factory=list)
    cell_timeout_s: float | None = None
    python: str = sys.executable

    def validate(self) -> "StudyConfig":
        def bad(name: str, why: str) -> ConfigError:
            flag = "--" + name.replace("_", "-")
            return ConfigError(f"study {flag} {getattr(self, name)!r}: {why}")

        if not self.data_path:
            raise bad("data_path", "give the dataset prefix (tools/preprocess_data.py output)")
        for name, allowed in (("loss_modes", LOSS_MODES), ("training_modes", TRAINING_MODES),
                              ("archs", ARCHS)):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise bad(name, "must be a non-empty list without repeats")
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise bad(name, f"unknown {unknown}; choose from {allowed}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise bad("seeds", "must be a non-empty list without repeats")
        if any(mode_uses_rho(m) for m in self.loss_modes) and not self.rhos:
            raise bad("rhos", "the grid has DRO modes: give at least one rho")
        if len(set(self.rhos)) != len(self.rhos) or any(not r >= 0 for r in self.rhos):
            raise bad("rhos", "must be distinct numbers >= 0")
        for name in ("train_iters", "seq_length", "micro_batch_size", "global_batch_size",
                     "log_interval", "nproc"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be an integer >= 1")
        for name in ("eval_interval", "test_eval_iters", "lr_warmup_iters"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "must be an integer >= 0")
        if not isinstance(self.eval_iters, int) or self.eval_iters < 1:
            raise bad("eval_iters", "must be >= 1: the table needs the final validation")
        lrs = self.tempnet_lr if isinstance(self.tempnet_lr, dict) else {}
        if set(lrs) - set(ARCHS) or (lrs and set(self.archs) - set(lrs)):
            raise bad("tempnet_lr", f"give one lr, or one per design of {self.archs} "
                                    "(e.g. paper=3e-2 scale_aware=1e-2)")
        if self.base_iters is not None and self.base_iters < 1:
            raise bad("base_iters", "must be >= 1 (or left out: train_iters)")
        if not self.cells():
            raise ConfigError("the study grid is empty: no (loss mode, training mode) pair of "
                              f"{self.loss_modes} x {self.training_modes} is trainable")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def cells(self) -> list["Cell"]:
        """The grid cells, seed-major (a finished first seed is a usable result)."""
        cells = []
        for seed in self.seeds:
            for loss in self.loss_modes:
                archs = self.archs if TempNetConfig(loss_mode=loss).uses_tempnet else (None,)
                for rho in (self.rhos if mode_uses_rho(loss) else (None,)):
                    for arch in archs:
                        for tmode in self.training_modes:
                            if mode_supported(loss, tmode):
                                cells.append(Cell(loss, rho, tmode, seed, self.train_iters,
                                                  arch))
        return cells

    def tempnet_lr_of(self, arch: str) -> float:
        return self.tempnet_lr[arch] if isinstance(self.tempnet_lr, dict) else self.tempnet_lr

    def base_cell(self, seed: int) -> "Cell":
        return Cell(BASE_LOSS_MODE, None, BASE_TRAINING_MODE, seed,
                    self.base_iters or self.train_iters)

    def plan(self) -> list["Cell"]:
        """Every run in order: per seed its base model (when a cell needs one) then its cells;
        a base equal to a grid cell is that cell (run once)."""
        runs: list[Cell] = []
        for seed in self.seeds:
            cells = [c for c in self.cells() if c.seed == seed]
            if any(c.needs_base for c in cells):
                cells.insert(0, self.base_cell(seed))
            for c in cells:
                if c not in runs:
                    runs.append(c)
        return runs


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    loss_mode: str
    rho: float | None
    training_mode: str
    seed: int
    train_iters: int
    arch: str | None = None  # the TempNet design (TempNet loss modes only)

    @property
    def needs_base(self) -> bool:
        return self.training_mode != "scratch"

    @property
    def name(self) -> str:
        rho = "norho" if self.rho is None else f"rho{self.rho:g}"
        arch = "" if self.arch is None else f"__{self.arch}"
        return (f"{self.loss_mode}{arch}__{rho}__{self.training_mode}__it{self.train_iters}"
                f"__s{self.seed}")

    @property
    def row_key(self) -> tuple:
        return (self.loss_mode, self.arch, self.rho, self.training_mode, self.train_iters)

    def label(self) -> str:
        rho = "" if self.rho is None else f" rho={self.rho:g}"
        arch = "" if self.arch is None else f" [{self.arch}]"
        return f"{self.loss_mode}{arch}{rho} {self.training_mode} ({self.train_iters} it)"


def default_rho(cfg: "StudyConfig", margin: float = 2.83) -> float:
    """The paper's GPT-2 setting rho = log V - 2.83 (docs/tempnet_math.md 5), V the padded
    vocabulary the trainer will build from this tokenizer, model preset and TP size (the
    trainer's parser)."""
    from megatron_tempnet.arguments import parse_args
    from megatron_tempnet.config import padded_vocab_size
    from megatron_tempnet.data.tokenizers import load_tokenizer

    run = parse_args(["--model", cfg.model, *cfg.extra_args])
    vocab = load_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model).vocab_size
    padded = padded_vocab_size(vocab, run.model.make_vocab_size_divisible_by,
                               run.parallel.tensor_model_parallel_size)
    return round(math.log(padded) - margin, 3)
