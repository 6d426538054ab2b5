"""A learning-quality study: does TempNet help, and where? (``tools/study.py`` is its CLI.)

A grid of short trainings, loss modes x rho x training mode x seeds, on one model preset and one
Megatron .bin/.idx dataset:

* loss modes come from ``tempnet.config.LOSS_MODES`` (new modes join by themselves); rho is
  swept only for the modes whose gradients depend on it (not :data:`RHO_FREE_LOSS_MODES`);
* the TempNet modes are run with every design of ``archs`` (``--tempnet-arch``: "paper",
  "scale_aware"); the other modes have no TempNet and run once;
* a (loss mode, training mode) pair the trainer's own validation rejects is left out (frozen_lm
  of a mode without TempNet has nothing to train): :func:`mode_supported`;
* finetune and frozen_lm start from a plain-CE base model per seed (``--load BASE --finetune``),
  trained once like any cell (with the same iterations it *is* the grid's ce/scratch cell).

Each cell runs as its own subprocess, ``python -m megatron_tempnet.train ...`` (``torchrun
--standalone`` for nproc > 1), so a crash is recorded (``error``) and the study goes on. Its
metrics come from its JSONL file (``training/metrics_log.py``): the validation evaluations of
``training/evaluate.py`` (perplexity and ECE at tau = 1, with the model's own tau, at the best
global temperature; TempNet's tau histogram) give the curves, the last one (at the final
iteration) the table. With ``test_eval_iters`` > 0 the final checkpoint is also evaluated on the
test split by ``python -m megatron_tempnet.evaluate`` with one fixed seed (the same tokens for
every cell), and those numbers go into the table instead.

Layout of the output directory::

    study.json                 the settings of the last invocation
    cells/<cell>/              command.txt, train.log, metrics.jsonl, [ckpt/, eval.log,
                               test_eval.jsonl], result.json (written atomically, last)
    results.md, results.json   one row per (loss mode, rho, training mode, iterations):
                               mean and standard deviation over seeds
    plots/valid_curves.png, plots/tau_histograms.png

Resume: a cell whose result.json exists, succeeded and was produced by the same command
(``fingerprint``) is not rerun; any other cell (never run, interrupted, failed, or its settings
changed) is deleted and rerun from scratch. Rerunning from scratch rather than from a mid-run
checkpoint keeps every cell's validation batches identical (the validation iterator is not part
of a checkpoint).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_tempnet.cli import read_exit_status
from megatron_tempnet.config import ConfigError
from megatron_tempnet.files import write_json_atomic
from megatron_tempnet.tempnet.config import ARCHS, LOSS_MODES, TRAINING_MODES, TempNetConfig

# Loss modes whose training does not depend on rho: plain CE; the DRO loss at a fixed tau
# (rho only adds the constant (rho - log V) * tau, docs/tempnet_math.md 1.7); TempNet trained
# with CE(z/tau) (no DRO term). Every other mode (tempnet_dro, dro_exact, any new DRO mode) is
# swept over rho.
RHO_FREE_LOSS_MODES = ("ce", "dro_fixed_tau", "tempnet_ce")
BASE_LOSS_MODE, BASE_TRAINING_MODE = "ce", "scratch"
FINAL_EVAL_SEED = 1234  # the test split is evaluated with this seed: same tokens for every cell
RESULT_FILE = "result.json"
# (key in a cell's summary, Markdown header, format) of the table, in order. Two ratios are
# paired, so the seed-to-seed spread of the data cancels: "own / best T" = ppl with the model's
# own tau / ppl at the best global T of the same evaluation (< 1: the per-token tau beats any
# single temperature); "own / ce" = ppl with the own tau / ppl of the same seed's ce/scratch
# cell (same validation tokens; < 1: better than plain CE).
COLUMNS = (("ppl tau=1", "ppl τ=1", "{:.2f}"),
           ("ppl own tau", "ppl own τ", "{:.2f}"),
           ("own tau", "own τ", "{:.3f}"),
           ("best T", "best T", "{:.3f}"),
           ("ppl best T", "ppl best T", "{:.2f}"),
           ("ece tau=1", "ECE τ=1", "{:.4f}"),
           ("ece own tau", "ECE own τ", "{:.4f}"),
           ("ece best T", "ECE best T", "{:.4f}"),
           ("own / best T", "own ÷ best T", "{:.3f}"),
           ("own / ce", "own ÷ CE", "{:.3f}"),
           ("tau std", "τ std", "{:.3f}"),  # the own tau's spread over tokens
           ("r2 tau*", "R² τ vs τ*", "{:.3f}"),  # tempnet_dro: TempNet's tau vs the exact tau*
           ("accuracy", "top-1", "{:.4f}"),
           ("wall s", "wall s", "{:.0f}"))


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


# --- commands --------------------------------------------------------------------------------

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


# --- running one cell ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _subprocess_env() -> dict:
    """A clean single-node launch: no inherited rank variables; a free port for the
    single-process rendezvous (torchrun --standalone picks its own)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return env


def _run_logged(cmd: list[str], log_path: Path, timeout_s: float | None) -> tuple[int, float]:
    """Run ``cmd`` with stdout+stderr into ``log_path``; (exit code, seconds). A timeout kills
    the process group and returns exit code 124 (as timeout(1))."""
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shell_line(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_subprocess_env(),
                                cwd=Path(__file__).resolve().parents[1], start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            log.write(f"\nstudy: killed after {timeout_s} s (--cell-timeout)\n")
            rc = 124
        except BaseException:  # Ctrl-C: stop the child too, leave the cell unfinished
            os.killpg(proc.pid, 9)
            proc.wait()
            raise
    return rc, time.perf_counter() - start


_ERROR_LINE = re.compile(r"(Error|Exception|error:|Traceback|diverged|killed|Killed)")


def error_summary(log_path: Path, rc: int, limit: int = 240) -> str:
    """``exit N: <the most telling line>`` of a failed command's log (the last line naming an
    error, else the last non-empty line)."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    hits = [ln for ln in lines if _ERROR_LINE.search(ln) and not ln.startswith("Traceback")]
    line = (hits or lines or ["(no output)"])[-1]
    return f"exit {rc}: {line[:limit]}"


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def _finite(value):
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):  # metrics_log's encoding
        return float(value)
    return value


def _own_suffix(metrics: dict) -> str | None:
    """The model's own temperature in an evaluation dict: "tempnet", "fixed tau", or any other
    ``ppl <x>`` key beside tau=1 and best T (a loss mode added later); None: tau = 1."""
    for key in metrics:
        if key.startswith("ppl ") and key not in ("ppl tau=1", "ppl best T"):
            return key[len("ppl "):]
    return None


def summarize(metrics: dict) -> dict:
    """The table's numbers from one evaluation dict (``training.evaluate.evaluate``'s keys)."""
    m = {k: _finite(v) for k, v in metrics.items()}
    own = _own_suffix(m)
    out = {"ppl tau=1": m["ppl tau=1"], "ece tau=1": m["ece tau=1"], "best T": m["best T"],
           "ppl best T": m["ppl best T"], "ece best T": m["ece best T"],
           "accuracy": m["accuracy"], "eval tokens": m["eval tokens"],
           "own tau name": own or "tau=1"}
    out.update({"tau std": m.get("tau std"), "r2 tau*": m.get("r2 tau*"),
                "pearson tau*": m.get("pearson tau*"), "tau* mean": m.get("tau* mean")})
    if own is None:
        out.update({"ppl own tau": m["ppl tau=1"], "ece own tau": m["ece tau=1"],
                    "own tau": 1.0})
    else:
        out.update({"ppl own tau": m[f"ppl {own}"], "ece own tau": m.get(f"ece {own}"),
                    "own tau": m.get("tau mean", m.get(own))})
    return out


def _curves(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(validation points, training points), one per iteration (the last record wins)."""
    valid, train = {}, {}
    for r in records:
        if r.get("split") == "valid":
            s = summarize(r)
            valid[r["iteration"]] = {"iteration": r["iteration"], **{
                k: s[k] for k in ("ppl tau=1", "ppl own tau", "ppl best T", "own tau")}}
        elif r.get("split") == "train":
            train[r["iteration"]] = {"iteration": r["iteration"],
                                     **{k: _finite(r[k]) for k in ("lm loss", "tau")
                                        if k in r}}
    return [valid[i] for i in sorted(valid)], [train[i] for i in sorted(train)]


def _parameters(records: list[dict]) -> int | None:
    """The model's parameter count from the run's configuration record in metrics.jsonl."""
    return next((r["parameters on this stage"] for r in records if r.get("split") == "config"),
                None)


def load_finished(cfg: StudyConfig, cell: Cell) -> dict | None:
    """The cell's result if it finished successfully with today's commands, else None."""
    path = cell_dir(cfg, cell) / RESULT_FILE
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if result.get("status") != "ok" or result.get("fingerprint") != fingerprint(cfg, cell):
        return None
    ckpt = cell_dir(cfg, cell) / "ckpt"
    if saves_checkpoint(cfg, cell) and read_latest_iteration(ckpt) != cell.train_iters:
        return None  # its checkpoint (a base model, or the test evaluation's input) is gone
    return result


def read_latest_iteration(ckpt: Path) -> int | None:
    """The iteration of ``ckpt``'s latest checkpoint marker (training/checkpointing.py)."""
    from megatron_tempnet.training.checkpoint_layout import read_latest

    try:
        return read_latest(ckpt) if ckpt.is_dir() else None
    except ConfigError:
        return None


def run_cell(cfg: StudyConfig, cell: Cell, base_result: dict | None) -> dict:
    """Train (and optionally test-evaluate) one cell from scratch; its result dict, also written
    atomically to ``result.json``. A failure is a result with status "failed" and an error."""
    d = cell_dir(cfg, cell)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    train_cmd = train_command(cfg, cell)
    commands = [train_cmd] + ([eval_command(cfg, cell)] if cfg.test_eval_iters else [])
    (d / "command.txt").write_text("".join(shell_line(c) + "\n" for c in commands))
    result = {"cell": cell.name, **dataclasses.asdict(cell), "fingerprint": fingerprint(cfg, cell),
              "status": "failed", "error": None, "wall s": 0.0, "final split": None,
              "final": None, "summary": None, "valid curve": [], "train curve": [],
              "parameters": None, "command": shell_line(train_cmd)}
    if cell.needs_base and (base_result is None or base_result["status"] != "ok"):
        result["error"] = f"base model {cfg.base_cell(cell.seed).name} failed"
    else:
        rc, wall = _run_logged(train_cmd, d / "train.log", cfg.cell_timeout_s)
        result["wall s"] = wall
        records = read_jsonl(d / "metrics.jsonl")
        result["parameters"] = _parameters(records)
        result["valid curve"], result["train curve"] = _curves(records)
        finals = [r for r in records
                  if r.get("split") == "valid" and r["iteration"] == cell.train_iters]
        if rc != 0:  # the trainer's own record of how it ended, else the log's last error
            status = read_exit_status(d / "ckpt") if (d / "ckpt").is_dir() else None
            result["error"] = (f"exit {status['exit_code']}: {status['message']}"[:240]
                               if status and status.get("exit_code") is not None
                               else error_summary(d / "train.log", rc))
        elif not finals:
            result["error"] = f"no validation record at iteration {cell.train_iters} in " \
                              f"{d / 'metrics.jsonl'}"
        else:
            result.update(status="ok", final=finals[-1], **{"final split": "valid"})
        if result["status"] == "ok" and cfg.test_eval_iters:
            rc, wall = _run_logged(commands[1], d / "eval.log", cfg.cell_timeout_s)
            result["wall s"] += wall
            tests = [r for r in read_jsonl(d / "test_eval.jsonl") if r.get("split") == "test"]
            if rc != 0 or not tests:
                result.update(status="failed", error=error_summary(d / "eval.log", rc))
            else:
                result.update(final=tests[-1], **{"final split": "test"})
        if result["final"] is not None:
            result["summary"] = {**summarize(result["final"]), "wall s": result["wall s"]}
    write_json_atomic(d / RESULT_FILE, result)
    return result


# --- the study -------------------------------------------------------------------------------

def _progress_line(result: dict) -> str:
    if result["status"] != "ok":
        return f"FAILED ({result['error']})"
    s = result["summary"]
    return (f"ppl tau=1 {s['ppl tau=1']:.2f}, own tau ({s['own tau name']}) "
            f"{s['ppl own tau']:.2f}, best T {s['best T']:.3g} -> {s['ppl best T']:.2f}, "
            f"ECE {s['ece tau=1']:.4f}/{s['ece own tau'] or float('nan'):.4f}/"
            f"{s['ece best T']:.4f} [{result['final split']}]")


def run_study(cfg: StudyConfig, log=print, plots: bool = True) -> dict:
    """Run (or resume) every cell, then write the tables and plots. Returns the results.json
    dict plus "ran" and "skipped" (cell names of this invocation)."""
    cfg.validate()
    out = cfg.out_dir
    (out / "cells").mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "python"}
    write_json_atomic(out / "study.json", settings)
    plan = cfg.plan()
    log(f"study: {len(plan)} runs ({len(cfg.cells())} grid cells) in {out}")
    results, ran, skipped = {}, [], []
    start = time.perf_counter()
    for i, cell in enumerate(plan, 1):
        head = f"[{i}/{len(plan)}] {cell.label()} seed {cell.seed}"
        result = load_finished(cfg, cell)
        if result is not None:
            skipped.append(cell.name)
            log(f"{head}: finished earlier, not rerun: {_progress_line(result)}")
        else:
            log(f"{head}: running ({cell_dir(cfg, cell)})")
            base = results.get(cfg.base_cell(cell.seed)) if cell.needs_base else None
            result = run_cell(cfg, cell, base)
            ran.append(cell.name)
            elapsed = time.perf_counter() - start
            eta = elapsed / len(ran) * (len(plan) - i)
            log(f"{head}: {result['wall s']:.0f} s, {_progress_line(result)} "
                f"(study {elapsed / 60:.1f} min, ~{eta / 60:.0f} min left)")
        results[cell] = result
    report = aggregate(cfg, results)
    write_tables(cfg, report, plots=plots)
    if plots:
        write_plots(cfg, report)
    failed = [r["cell"] for r in results.values() if r["status"] != "ok"]
    log(f"study: ran {len(ran)}, reused {len(skipped)}, failed {len(failed)}; tables "
        f"{out / 'results.md'}, {out / 'results.json'}" + (f", plots {out / 'plots'}"
                                                           if plots else ""))
    return {**report, "ran": ran, "skipped": skipped}


def _mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; None with one value)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / len(values)
    std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
           if len(values) > 1 else None)
    return {"mean": mean, "std": std, "n": len(values)}


def aggregate(cfg: StudyConfig, results: dict) -> dict:
    """results.json: one row per (loss mode, rho, training mode, iterations), mean and std over
    the seeds that succeeded; every cell's own numbers and errors under "cells"."""
    rows: dict[tuple, list] = {}
    ce_ppl = {}  # seed -> ppl of its ce/scratch cell (the reference of "own / ce")
    for cell, result in results.items():
        rows.setdefault(cell.row_key, []).append((cell, result))
        if result["status"] == "ok" and cell == Cell(BASE_LOSS_MODE, None, BASE_TRAINING_MODE,
                                                     cell.seed, cfg.train_iters):
            ce_ppl[cell.seed] = result["summary"]["ppl tau=1"]
    for cell, result in results.items():
        s = result["summary"]
        if s is not None:  # derived here: a cached result.json may predate these columns
            s["own / best T"] = s["ppl own tau"] / s["ppl best T"]
            s["own / ce"] = s["ppl own tau"] / ce_ppl[cell.seed] if cell.seed in ce_ppl else None
    table = []
    for (loss, arch, rho, tmode, iters), members in rows.items():
        ok = [r for _, r in members if r["status"] == "ok"]
        row = {"loss mode": loss, "arch": arch, "rho": rho, "training mode": tmode,
               "iterations": iters,
               "seeds": [c.seed for c, _ in members], "seeds ok": len(ok),
               "own tau name": ok[0]["summary"]["own tau name"] if ok else None,
               "final split": ok[0]["final split"] if ok else None,
               "error": "; ".join(f"seed {c.seed}: {r['error']}" for c, r in members
                                  if r["status"] != "ok") or None}
        for key, _, _ in COLUMNS:
            row[key] = _mean_std([r["summary"].get(key) for r in ok])
        table.append(row)
    cells = [{k: r.get(k) for k in ("cell", "loss_mode", "arch", "rho", "training_mode", "seed",
                                "train_iters", "status", "error", "wall s", "final split",
                                "summary", "parameters", "command")}
             for r in results.values()]
    tokens = cfg.train_iters * cfg.global_batch_size * cfg.seq_length
    params = next((r["parameters"] for r in results.values() if r["parameters"]), None)
    return {"settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "python"},
            "train tokens per cell": tokens, "parameters (first cell)": params,
            "columns": [key for key, _, _ in COLUMNS], "rows": table, "cells": cells,
            "curves": {r["cell"]: {"valid": r["valid curve"], "train": r["train curve"],
                                   "tau histogram": (r["final"] or {}).get("tau histogram"),
                                   "tau mean": (r["summary"] or {}).get("own tau")}
                       for r in results.values()}}


def _cell_text(stat: dict, fmt: str) -> str:
    if stat["mean"] is None:
        return "-"
    text = fmt.format(stat["mean"])
    return text if stat["std"] is None else f"{text} ± {fmt.format(stat['std'])}"


def markdown_table(report: dict) -> str:
    """The rows of ``report`` as a Markdown table (mean ± std over seeds)."""
    header = ["loss mode", "TempNet", "rho", "training", "iters", "seeds ok", "own τ is"]
    header += [title for _, title, _ in COLUMNS] + ["error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        cells = [row["loss mode"], row.get("arch") or "-",
                 "-" if row["rho"] is None else f"{row['rho']:g}",
                 row["training mode"], str(row["iterations"]),
                 f"{row['seeds ok']}/{len(row['seeds'])}", row["own tau name"] or "-"]
        cells += [_cell_text(row[key], fmt) for key, _, fmt in COLUMNS]
        cells.append((row["error"] or "").replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(cfg: StudyConfig, report: dict, plots: bool = True) -> None:
    out = cfg.out_dir
    write_json_atomic(out / "results.json", report)
    split = {r["final split"] for r in report["rows"] if r["final split"]}
    where = ("the test split (python -m megatron_tempnet.evaluate, seed "
             f"{FINAL_EVAL_SEED}, {cfg.test_eval_iters} global batches)" if split == {"test"}
             else f"the validation split at the last iteration ({cfg.eval_iters} global batches)")
    text = (f"# Study: {cfg.model} on {' '.join(cfg.data_path)}\n\n"
            f"Mean ± standard deviation over seeds {list(cfg.seeds)}; {cfg.train_iters} "
            f"iterations x {cfg.global_batch_size} x {cfg.seq_length} tokens per cell; "
            f"metrics on {where}. \"own τ\": the model's own temperature (TempNet's per-token "
            "tau, its mean shown; the fixed tau; 1 for CE).\n\n"
            + markdown_table(report) + "\n"
            + ("\nPlots: [validation curves](plots/valid_curves.png), "
               "[tau histograms](plots/tau_histograms.png).\n" if plots else ""))
    tmp = out / ".results.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out / "results.md")


def _row_label(row: dict) -> str:
    rho = "" if row["rho"] is None else f" ρ={row['rho']:g}"
    arch = f" [{row['arch']}]" if row.get("arch") else ""
    return f"{row['loss mode']}{arch}{rho} {row['training mode']}"


def _mean_curve(curves: list[list[dict]], key: str) -> tuple[list, list, list]:
    """(iterations, mean, std) of ``key`` over seeds, at the iterations every seed has."""
    common = set.intersection(*[{p["iteration"] for p in c} for c in curves]) if curves else set()
    its = sorted(common)
    means, stds = [], []
    for it in its:
        stat = _mean_std([next(p[key] for p in c if p["iteration"] == it) for c in curves])
        means.append(stat["mean"])
        stds.append(stat["std"] or 0.0)
    return its, means, stds


def write_plots(cfg: StudyConfig, report: dict, out_dir: Path | None = None) -> list[Path]:
    """plots/valid_curves.png (validation perplexity at tau = 1, own tau and best T, and the
    mean tau, mean ± std over seeds per row) and plots/tau_histograms.png (the final
    evaluation's per-token tau of every TempNet row, summed over seeds). Needs matplotlib
    (``pip install .[dev]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir or cfg.out_dir / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    by_row: dict[str, list] = {}
    for c in report["cells"]:
        if c["status"] == "ok":
            key = _row_label({"loss mode": c["loss_mode"], "rho": c["rho"],
                              "arch": c.get("arch"), "training mode": c["training_mode"]})
            if c["train_iters"] != cfg.train_iters:
                key += f" ({c['train_iters']} it)"
            by_row.setdefault(key, []).append(report["curves"][c["cell"]])
    panels = (("ppl tau=1", "valid ppl at τ = 1"), ("ppl own tau", "valid ppl, own τ"),
              ("ppl best T", "valid ppl, best global T"), ("own tau", "own τ (mean)"))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=80)
    for ax, (key, title) in zip(axes.flat, panels):
        for label, curves in by_row.items():
            its, mean, std = _mean_curve([c["valid"] for c in curves], key)
            if not its:
                continue
            line, = ax.plot(its, mean, marker=".", label=label)
            ax.fill_between(its, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=line.get_color(),
                            alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=9)
        if key.startswith("ppl"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.025 * (len(labels) // 3), 1, 1))
    paths = [out_dir / "valid_curves.png"]
    fig.savefig(paths[0])
    plt.close(fig)

    hists = {label: [c for c in curves if c["tau histogram"]] for label, curves in by_row.items()}
    hists = {k: v for k, v in hists.items() if v}
    n = max(len(hists), 1)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((n + 2) // 3)),
                             dpi=80, squeeze=False)
    for ax, (label, members) in zip(axes.flat, hists.items()):
        hs = [c["tau histogram"] for c in members]
        edges = hs[0]["edges"]
        counts = [sum(h["counts"][i] for h in hs) for i in range(len(edges) - 1)]
        total = sum(counts) or 1.0
        ax.bar(edges[:-1], [c / total for c in counts], width=[b - a for a, b in
                                                               zip(edges[:-1], edges[1:])],
               align="edge", edgecolor="black", linewidth=0.3)
        mean = _mean_std([c["tau mean"] for c in members])["mean"]
        ax.axvline(mean, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"{label}: mean τ {mean:.2f}", fontsize=9)
        ax.set_xlabel("τ", fontsize=9)
        ax.set_ylabel("fraction of tokens", fontsize=8)
    for ax in list(axes.flat)[len(hists):]:
        ax.axis("off")
        if not hists:
            ax.text(0.5, 0.5, "no TempNet rows", ha="center", va="center")
    fig.tight_layout()
    paths.append(out_dir / "tau_histograms.png")
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
