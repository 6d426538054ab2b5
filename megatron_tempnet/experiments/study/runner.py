"""Running the study: each cell as its own subprocess (a crash is recorded and the study goes
on), its ``result.json`` written atomically, resume (a finished cell with unchanged commands is
reused), then the tables and plots."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from megatron_tempnet.cli import read_exit_status
from megatron_tempnet.config import ConfigError
from megatron_tempnet.experiments.study.aggregate import aggregate
from megatron_tempnet.experiments.study.commands import (cell_dir, eval_command, fingerprint,
                                                         saves_checkpoint, shell_line,
                                                         train_command)
from megatron_tempnet.experiments.study.config import Cell, StudyConfig
from megatron_tempnet.experiments.study.metrics import _curves, _parameters, read_jsonl, summarize
from megatron_tempnet.experiments.study.plots import write_plots
from megatron_tempnet.experiments.study.report import write_tables
from megatron_tempnet.files import write_json_atomic

RESULT_FILE = "result.json"


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
        # cwd: the repository root (this file is megatron_tempnet/experiments/study/runner.py)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_subprocess_env(),
                                cwd=Path(__file__).resolve().parents[3], start_new_session=True)
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
