"""tools/study.py and megatron_tempnet/experiments/study/: the grid rules (no training), then
tiny real studies on the demo corpus (fixture ``tiny_corpus``): every column and plot, resume
without rerunning finished cells, a deleted cell rerun, a crashing cell recorded, the test-split
evaluation.

The studies run their cells as single-threaded subprocesses (mostly imports), one at a time: the
crash and test-split studies (fixture ``side_studies``) run in a background thread beside the
smoke study, on the core its cells leave idle (CI has 2)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_tempnet.experiments.study import (COLUMNS, RESULT_FILE, StudyConfig, cell_dir,
                                                eval_command, fingerprint, mode_uses_rho,
                                                train_command)
from megatron_tempnet.tempnet.config import LOSS_MODES, TRAINING_MODES, TempNetConfig
from torchrun import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(tmp_path, **kw) -> StudyConfig:
    base = dict(data_path=["data/x_text_document"], tokenizer_model="tok.model",
                out=str(tmp_path / "out"), loss_modes=LOSS_MODES, rhos=(4.0, 5.0),
                training_modes=TRAINING_MODES, seeds=(1, 2))
    return StudyConfig(**{**base, **kw}).validate()


def test_grid_rules(tmp_path):
    cfg = _config(tmp_path)
    cells = cfg.cells()
    for loss in LOSS_MODES:
        rhos = {c.rho for c in cells if c.loss_mode == loss}
        assert rhos == ({4.0, 5.0} if mode_uses_rho(loss) else {None}), loss
        frozen = any(c.loss_mode == loss and c.training_mode == "frozen_lm" for c in cells)
        assert frozen == TempNetConfig(loss_mode=loss).uses_tempnet, loss
    assert not mode_uses_rho("ce") and mode_uses_rho("tempnet_dro")
    # one cell per (mode, rho, training mode, seed); the base of each seed is the ce/scratch cell
    assert len(set(cells)) == len(cells)
    plan = cfg.plan()
    assert len(plan) == len(cells) and plan[0] == cfg.base_cell(1)
    assert plan.index(cfg.base_cell(2)) < min(plan.index(c) for c in cells
                                              if c.seed == 2 and c.needs_base)
    for cell in cells:
        cmd = train_command(cfg, cell)
        assert cmd[:3] == [sys.executable, "-m", "megatron_tempnet.train"]
        assert ("--tempnet-rho" in cmd) == (cell.rho is not None)
        assert cmd[cmd.index("--seed") + 1] == str(cell.seed)
        if cell.needs_base:
            base_ckpt = str(cell_dir(cfg, cfg.base_cell(cell.seed)) / "ckpt")
            assert cmd[cmd.index("--load") + 1] == base_ckpt and "--finetune" in cmd
            assert base_ckpt == train_command(cfg, cfg.base_cell(cell.seed))[
                train_command(cfg, cfg.base_cell(cell.seed)).index("--save") + 1]
        else:
            assert "--load" not in cmd
    # a base distinct from the grid when its iterations differ; it saves, grid cells do not
    cfg2 = _config(tmp_path, base_iters=7, training_modes=("scratch", "frozen_lm"))
    plan2 = cfg2.plan()
    assert len(plan2) == len(cfg2.cells()) + 2 and plan2[0].train_iters == 7
    tn = next(c for c in cfg2.cells() if c.loss_mode == "tempnet_dro")
    assert "--save" in train_command(cfg2, plan2[0]) and "--save" not in train_command(cfg2, tn)
    # the fingerprint follows the commands (not the output directory)
    moved = _config(tmp_path, out=str(tmp_path / "elsewhere"))
    cell = cells[3]
    assert fingerprint(moved, cell) == fingerprint(cfg, cell)
    assert fingerprint(_config(tmp_path, train_iters=101), cell) != fingerprint(cfg, cell)
    # torchrun for several processes, evaluation on the test split with a fixed seed
    multi = _config(tmp_path, nproc=2, test_eval_iters=3)
    assert train_command(multi, cell)[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node", "2"]
    ev = eval_command(multi, cell)
    assert ev[ev.index("--eval-split") + 1] == "test" and "--load" in ev
    with pytest.raises(Exception, match="seeds"):
        _config(tmp_path, seeds=(1, 1))


def _study(corpus, out: Path, *args: str, cwd=REPO) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "study.py"), "--data-path", corpus.data_prefix,
           "--tokenizer-model", corpus.tokenizer_model, "--out", str(out), "--model", "tiny-gpt",
           "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
           "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "2",
           "--eval-iters", "1", "--rho", "4.0", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def _crash_study(corpus, out: Path) -> subprocess.CompletedProcess:
    """A base model that crashes (a bad model flag under ``--``) with a cell depending on it."""
    return _study(corpus, out, "--loss-modes", "tempnet_dro", "--training-modes", "frozen_lm",
                  "--seeds", "1", "--train-iters", "2", "--no-plots", "--",
                  "--num-attention-heads", "3")


def _test_split_study(corpus, cwd: Path) -> subprocess.CompletedProcess:
    """From outside the repository (``cwd``) with a relative --out: ``cwd / "study"``."""
    return _study(corpus, Path("study"), "--loss-modes", "tempnet_dro", "--training-modes",
                  "scratch", "--seeds", "1", "--train-iters", "2", "--test-eval-iters", "2",
                  "--no-plots", cwd=cwd)


@pytest.fixture(scope="module")
def side_studies(request, tiny_corpus, tmp_path_factory):
    """The crash and the test-split studies (of the selected tests), started one after the
    other in a background thread when the smoke study starts; each test waits for its own:
    {test name: (out dir, future of the finished study)}."""
    selected = {item.originalname for item in request.session.items
                if getattr(item, "module", None) is request.module}
    crash, split = tmp_path_factory.mktemp("crash"), tmp_path_factory.mktemp("test_split")
    studies = {"test_crashing_cell_is_recorded": (crash / "study", _crash_study,
                                                  crash / "study"),
               "test_final_evaluation_on_the_test_split": (split / "study", _test_split_study,
                                                           split)}
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield {name: (out, pool.submit(run, tiny_corpus, where))
               for name, (out, run, where) in studies.items() if name in selected}


def _lines(stdout: str, word: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith("[") and word in ln]


def test_smoke_study_resumes(tiny_corpus, tmp_path, side_studies):
    out = tmp_path / "study"
    grid = ["--loss-modes", "ce", "tempnet_dro", "--training-modes", "scratch", "frozen_lm",
            "--seeds", "1", "2", "--train-iters", "3", "--archs", "paper", "scale_aware",
            "--tempnet-lr", "paper=3e-2", "scale_aware=1e-2"]
    first = _study(tiny_corpus, out, *grid)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert len(_lines(first.stdout, ": running")) == 10, first.stdout

    report = json.loads((out / "results.json").read_text())
    by_arch = {(r["loss mode"], r["arch"], r["training mode"]): r for r in report["rows"]}
    assert set(by_arch) == {("ce", None, "scratch")} | {
        ("tempnet_dro", a, t) for a in ("paper", "scale_aware") for t in ("scratch", "frozen_lm")}
    for cell in report["cells"]:  # each design trains with its own lr
        lr = {"paper": "0.03", "scale_aware": "0.01", None: None}[cell["arch"]]
        assert (f"--tempnet-lr {lr}" in cell["command"]) if lr else \
            "--tempnet-lr" not in cell["command"]
        assert (f"--tempnet-arch {cell['arch']}" in cell["command"]) == bool(cell["arch"])
    # tau spread over tokens and R^2 against tau* exist for TempNet rows only
    tempnet_only = ("tau std", "r2 tau*")
    for row in by_arch.values():
        assert row["seeds ok"] == 2 and row["error"] is None
        for key, _, _ in COLUMNS:  # every column: a mean and a standard deviation
            if key in tempnet_only and row["arch"] is None:
                assert row[key]["n"] == 0, (key, row)
                continue
            if key == "r2 tau*" and row[key]["n"] == 0:  # tau* without spread: no R^2
                continue
            assert row[key]["n"] == 2 and math.isfinite(row[key]["mean"]), (key, row)
            assert row[key]["std"] is not None and row[key]["std"] >= 0, (key, row)
    # at init the scale_aware design has tau0 = 1 for every token: after 3 steps, a spread
    assert by_arch[("tempnet_dro", "scale_aware", "scratch")]["tau std"]["mean"] > 0
    rows = {(r["loss mode"], r["training mode"]): r for r in report["rows"]
            if r["arch"] in (None, "paper")}
    assert rows[("ce", "scratch")]["own tau"]["mean"] == 1.0
    assert rows[("tempnet_dro", "scratch")]["own tau name"] == "tempnet"
    assert rows[("tempnet_dro", "scratch")]["rho"] == 4.0 and rows[("ce", "scratch")]["rho"] is None
    # best T is the argmin over a grid holding T = 1: never worse than tau = 1
    for row in rows.values():
        assert row["ppl best T"]["mean"] <= row["ppl tau=1"]["mean"] * (1 + 1e-9)
    # frozen_lm trains TempNet on the seed's CE base: its LM (tau = 1) is the base's, exactly
    cells = {(c["loss_mode"], c["training_mode"], c["seed"]): c for c in report["cells"]
             if c["arch"] in (None, "paper")}
    for seed in (1, 2):
        frozen = cells[("tempnet_dro", "frozen_lm", seed)]["summary"]["ppl tau=1"]
        base = cells[("ce", "scratch", seed)]["summary"]["ppl tau=1"]
        assert frozen == pytest.approx(base, rel=1e-6)
        assert cells[("ce", "scratch", seed)]["parameters"] > 0
    curves = report["curves"][cells[("tempnet_dro", "scratch", 1)]["cell"]]
    assert [p["iteration"] for p in curves["valid"]] == [2, 3]
    assert sum(curves["tau histogram"]["counts"]) > 0

    md = (out / "results.md").read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| loss mode"))
    for _, title, _ in COLUMNS:
        assert f" {title} |" in header
    assert len([ln for ln in md.splitlines() if ln.startswith("| ")]) == 1 + 5
    assert "| tempnet_dro | scale_aware | 4 |" in md
    assert "±" in md and "valid_curves.png" in md
    for name in ("valid_curves.png", "tau_histograms.png"):
        data = (out / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name

    # resume: nothing finished is rerun; a deleted cell is
    results = {p.parent.name: p for p in (out / "cells").glob(f"*/{RESULT_FILE}")}
    assert len(results) == 10
    mtimes = {name: p.stat().st_mtime_ns for name, p in results.items()}
    deleted = cells[("tempnet_dro", "scratch", 2)]["cell"]
    shutil.rmtree(out / "cells" / deleted)
    second = _study(tiny_corpus, out, *grid)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    rerun = _lines(second.stdout, ": running")
    assert len(rerun) == 1 and deleted in rerun[0], second.stdout
    assert len(_lines(second.stdout, "finished earlier, not rerun")) == 9, second.stdout
    for name, mtime in mtimes.items():
        if name != deleted:
            assert results[name].stat().st_mtime_ns == mtime, name
    assert (out / "cells" / deleted / RESULT_FILE).exists()
    again = json.loads((out / "results.json").read_text())
    assert [r["seeds ok"] for r in again["rows"]] == [2] * 5


def test_crashing_cell_is_recorded(side_studies):
    """A base model that crashes (bad model flag) is an error row; its dependent cell is not run
    and says why; the study still writes its tables and exits 2."""
    out, future = side_studies["test_crashing_cell_is_recorded"]
    res = future.result()
    assert res.returncode == 2, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads((out / "results.json").read_text())
    errors = {r["training mode"]: r["error"] for r in report["rows"]}
    # the trainer's one-line bad-input error (exit code 2, megatron_tempnet/cli.py)
    assert "exit 2: error: " in errors["scratch"] and "--num-attention-heads 3" in errors["scratch"]
    assert "base model" in errors["frozen_lm"]
    assert "FAILED" in res.stdout and "num-attention-heads" in (out / "results.md").read_text()


def test_final_evaluation_on_the_test_split(side_studies):
    """Also: run from outside the repository with a relative --out (the cells run with the
    repository as their working directory), and --no-plots links no plots."""
    out, future = side_studies["test_final_evaluation_on_the_test_split"]
    res = future.result()
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    cell = json.loads((out / "results.json").read_text())["cells"][0]
    record = json.loads((out / "cells" / cell["cell"] / "test_eval.jsonl").read_text())
    assert cell["final split"] == "test" and record["split"] == "test"
    assert record["eval tokens"] == 2 * 4 * 32
    assert cell["summary"]["ppl own tau"] == record["ppl tempnet"]
    assert "test split" in (out / "results.md").read_text()
    assert "Plots:" not in (out / "results.md").read_text()
