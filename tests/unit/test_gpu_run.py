"""bench/gpu_run.py, the one-command GPU run (docs/benchmarks.md): --smoke runs every part on the
CPU at tiny sizes and writes the JSON and the Markdown; the runner's watchdog, time budget and
ratios work on made-up results. The GPU run itself needs a lent GPU and has not run yet."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_run  # noqa: E402

PARTS = {"a", "b", "c", "c_hf", "d"}


@pytest.mark.triton
def test_smoke_runs_every_part(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, TRITON_INTERPRET="1")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "bench/gpu_run.py", "--smoke", str(out),
                           "--work-dir", str(tmp_path / "work")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - start
    assert (out / "gpu_run.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_run.json").read_text())
    assert set(data["parts"]) == PARTS
    for key, part in data["parts"].items():
        assert part["status"] == "ok", (key, part["status"], part.get("log_tail"))
        assert part["rows"] or key == "a", key  # part a lists failures only
        for row in part["rows"]:
            status = row["status"]
            assert status == "ok" or (status.startswith("skipped: ") and len(status) > 10), \
                (key, row)
    assert data["parts"]["a"]["meta"]["passed"] >= 3
    b = {(r["key"], r["V"]): r for r in data["parts"]["b"]["rows"]}
    for impl in ("dense_ce", "reference", "fused", "fused_linear"):
        for vocab in (257, 1000):
            assert b[impl, vocab]["ms"] > 0 and b[impl, vocab]["time vs dense_ce"] > 0
    for peer, module in (("liger", "liger_kernel"), ("cce", "cut_cross_entropy")):
        # peers: GPU only, and recorded as not installed where they are not
        assert b[peer, 257]["status"].startswith("skipped: ")
        if not gpu_run.importable(module):
            assert b[peer, 257]["status"] == f"skipped: {module} not installed"
    c = data["parts"]["c"]["rows"]
    assert {(r["loss mode"], r["impl"]) for r in c} >= {("ce", "n/a"),
                                                        ("tempnet_dro", "fused_linear")}
    assert all(r["tokens/s"] > 0 for r in c)
    assert data["parts"]["c_hf"]["rows"][0]["tokens/s"] > 0
    steps = {r["step"]: r for r in data["parts"]["d"]["rows"]}
    assert list(steps) == ["corpus", "tokenizer", "preprocess", "train", "resume", "export",
                           "generate"]
    assert all(r["rc"] == 0 for r in steps.values())
    assert any(line.startswith("summary: iterations 4..6") for line in
               steps["resume"]["key_lines"])
    md = (out / "gpu_run.md").read_text()
    for title in ("## a.", "## b.", "## c.", "## c_hf.", "## d.", "| part | status |"):
        assert title in md
    assert proc.returncode == 0, proc.stdout[-3000:]
    print(f"smoke wall time {seconds:.0f} s")


def runner(tmp_path, budget=60.0, smoke=True):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    return gpu_run.Runner(out, work, smoke, time.monotonic(), budget, {"versions": {}},
                          dict(os.environ), "layers")


def test_watchdog_kills_an_overtime_process(tmp_path):
    r = runner(tmp_path)
    start = time.monotonic()
    rc, seconds, text = r.run_proc([sys.executable, "-c", "import time; print('hi', flush=True);"
                                    " time.sleep(60)"], 1.0, tmp_path / "sleep.log")
    assert rc is None and seconds < 30 and time.monotonic() - start < 30
    assert "hi" in text and "sleep.log" in (r.out / "gpu_run.log").read_text()


def test_a_part_over_the_budget_is_skipped_and_reported(tmp_path):
    r = runner(tmp_path, budget=0.0)
    r.run_part(gpu_run.PARTS[0])
    data = json.loads((r.out / "gpu_run.json").read_text())
    assert data["parts"]["a"]["status"].startswith("skipped: out of time budget")
    assert "skipped: out of time budget" in (r.out / "gpu_run.md").read_text()


def test_ratios_and_markdown_of_a_gpu_report():
    data = {"env": {"date": "d", "versions": {"torch": "2.11.0"}, "gpu": "NVIDIA H200"},
            "budget_s": 500, "elapsed_s": 1, "parts": {
                "b": {"title": "b", "status": "ok", "meta": {}, "rows": [
                    {"key": "liger", "impl": "Liger", "V": 32000, "ms": 20.0, "GiB": 1.0,
                     "status": "ok"},
                    {"key": "dense_ce", "impl": "dense", "V": 32000, "ms": 25.0, "GiB": 8.0,
                     "status": "ok"},
                    {"key": "fused_linear", "impl": "fused_linear", "V": 32000, "ms": 22.0,
                     "GiB": 0.5, "status": "ok"},
                    {"key": "cce", "impl": "Cut CE", "V": 32000, "status": "error: OOM"}]},
                "c": {"title": "c", "status": "ok", "meta": {}, "rows": [
                    {"loss mode": "ce", "attention": "sdpa", "impl": "n/a", "ms/step": 200.0,
                     "tokens/s": 40960.0, "MFU": 0.5, "status": "ok"},
                    {"loss mode": "tempnet_dro", "attention": "sdpa", "impl": "fused_linear",
                     "ms/step": 206.0, "tokens/s": 39767.0, "MFU": 0.48, "status": "ok"}]},
                "c_hf": {"title": "c_hf", "status": "ok", "meta": {}, "rows": [
                    {"model": "HF", "mode": "compile", "ms/step": 160.0, "status": "ok"}]}}}
    gpu_run.add_ratios(data)
    fl = data["parts"]["b"]["rows"][2]
    assert fl["time vs liger"] == pytest.approx(1.1) and fl["memory vs liger"] == 0.5
    assert fl["time vs dense_ce"] == pytest.approx(0.88)
    tempnet = data["parts"]["c"]["rows"][1]
    assert tempnet["time vs CE"] == pytest.approx(1.03)
    assert tempnet["time vs HF compile"] == pytest.approx(206 / 160)
    md = gpu_run.render_markdown(data)
    assert "| fused_linear | 32000 | 22.0 | 0.50 | 1.10x | 0.50x | 0.88x |" in md
    assert "error: OOM" in md and "NVIDIA H200" in md and "48.0%" in md


def test_bundle_list_names_the_missing_packages():
    pins = gpu_run.read_bundle_list()
    assert pins == ["megatron-core==0.16.1", "liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"]
    wheel_names = {p.split("==")[0].replace("-", "_") for p in pins}
    assert wheel_names == set(gpu_run.BUNDLE_MODULES.values())


def test_kernel_test_counts_survive_a_stopped_pytest():
    out = ("tests/unit/test_dro_kernels.py::test_a[dtype0-dro] PASSED  [  5%]\n"
           "tests/unit/test_dro_kernels.py::test_b FAILED  [ 10%]\n")
    counts, failures = gpu_run.parse_verbose(out)
    assert (counts["tests"], counts["passed"], counts["failures"]) == (2, 1, 1)
    assert failures[0]["test"] == "tests/unit/test_dro_kernels.py::test_b"
