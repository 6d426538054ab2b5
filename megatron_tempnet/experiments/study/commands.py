"""The command lines of a cell: its training (``python -m megatron_tempnet.train``), its
optional test-split evaluation (``python -m megatron_tempnet.evaluate``), and their
:func:`fingerprint` (a finished cell with unchanged commands is not rerun)."""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

from megatron_tempnet.experiments.study.config import Cell, StudyConfig

FINAL_EVAL_SEED = 1234  # the test split is evaluated with this seed: same tokens for every cell


def cell_dir(cfg: StudyConfig, cell: Cell) -> Path:
    return cfg.out_dir / "cells" / cell.name


def _launcher(cfg: StudyConfig, module: str) -> list[str]:
    if cfg.nproc == 1:
        return [cfg.python, "-m", module]
    return [cfg.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(cfg.nproc), "-m", module]


def _model_flags(cfg: StudyConfig, cell: Cell) -> list[str]:
    """Flags that describe the model and data: the same for training and evaluation."""
    flags = ["--model", cfg.model, "--data-path", *cfg.data_path,
             "--tokenizer-type", cfg.tokenizer_type, "--tokenizer-model", cfg.tokenizer_model,
             "--split", cfg.split, "--data-cache-path", str(cfg.out_dir / "index_cache"),
             "--seq-length", str(cfg.seq_length), "--micro-batch-size", str(cfg.micro_batch_size),
             "--global-batch-size", str(cfg.global_batch_size),
             "--tempnet-loss-mode", cell.loss_mode,
             "--tempnet-training-mode", cell.training_mode]
    if cell.rho is not None:
        flags += ["--tempnet-rho", repr(cell.rho)]
    if cell.arch is not None:
        flags += ["--tempnet-arch", cell.arch]
    if cfg.fixed_tau is not None and cell.loss_mode == "dro_fixed_tau":
        flags += ["--tempnet-fixed-tau", repr(cfg.fixed_tau)]
    return flags


def saves_checkpoint(cfg: StudyConfig, cell: Cell) -> bool:
    """A base model (finetune/frozen_lm cells load it) or a cell evaluated on the test split."""
    bases = {cfg.base_cell(c.seed) for c in cfg.cells() if c.needs_base}
    return cell in bases or cfg.test_eval_iters > 0


def train_command(cfg: StudyConfig, cell: Cell) -> list[str]:
    d = cell_dir(cfg, cell)
    cmd = [*_launcher(cfg, "megatron_tempnet.train"), *_model_flags(cfg, cell),
           "--train-iters", str(cell.train_iters), "--lr", repr(cfg.lr),
           "--min-lr", repr(cfg.min_lr), "--lr-warmup-iters", str(cfg.lr_warmup_iters),
           "--seed", str(cell.seed),
           "--log-interval", str(cfg.log_interval), "--eval-interval", str(cfg.eval_interval),
           "--eval-iters", str(cfg.eval_iters), "--metrics-jsonl", str(d / "metrics.jsonl")]
    if cell.arch is not None:  # TempNet modes only: keep CE cells (and their fingerprints)
        cmd += ["--tempnet-lr", repr(cfg.tempnet_lr_of(cell.arch))]  # TempNet-free
    if saves_checkpoint(cfg, cell):
        cmd += ["--save", str(d / "ckpt")]
    if cell.needs_base:
        cmd += ["--load", str(cell_dir(cfg, cfg.base_cell(cell.seed)) / "ckpt"), "--finetune"]
    return cmd + list(cfg.extra_args)


def eval_command(cfg: StudyConfig, cell: Cell) -> list[str]:
    """The final checkpoint on the test split (``python -m megatron_tempnet.evaluate``)."""
    d = cell_dir(cfg, cell)
    return [*_launcher(cfg, "megatron_tempnet.evaluate"), *_model_flags(cfg, cell),
            "--load", str(d / "ckpt"), "--eval-split", "test",
            "--eval-iters", str(cfg.test_eval_iters), "--seed", str(FINAL_EVAL_SEED),
            "--metrics-jsonl", str(d / "test_eval.jsonl"), *cfg.extra_args]


def fingerprint(cfg: StudyConfig, cell: Cell) -> str:
    """Hash of the cell's commands (output directory and interpreter path left out): a finished
    cell whose commands are unchanged is not rerun."""
    out, commands = str(cfg.out_dir), [train_command(cfg, cell)]
    if cfg.test_eval_iters:
        commands.append(eval_command(cfg, cell))
    if cell.needs_base:  # a changed base makes this cell stale too
        commands.append(train_command(cfg, cfg.base_cell(cell.seed)))
    text = json.dumps([[a.replace(out, "$OUT") for a in c[1:]] for c in commands])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shell_line(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
