"""Nothing lost, nothing silently changed: checkpoints, resume flags, exit codes.

Most cases run the real commands (train / evaluate / export ``main``) in ONE worker process
(tests/workers/reliability_worker.py: megatron-core imported once) and assert, per case, the
exit code, the one ``error:`` line (no traceback) and that the checkpoint directories are
byte-for-byte unchanged. Cases needing their own processes (a live lock holder, a SIGTERM during
start-up, two torchrun ranks) launch them here; they come first, and the worker (fixture
``worker``, one core) runs in the background meanwhile.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_tempnet.training.checkpoint_config import CheckpointConfig
from megatron_tempnet.training.run_control import RunControl, TrainingDiverged
from reliability import assert_one_error
from torchrun import REPO, free_port

WORKER = REPO / "tests" / "workers" / "reliability_worker.py"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
           OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
    ENV.pop(key, None)


@pytest.fixture(scope="module")
def worker(tiny_corpus, tmp_path_factory):
    """The scenarios' worker, started in the background: it runs (on one core) beside the tests
    that launch processes of their own, which come first in this file and start it."""
    work = tmp_path_factory.mktemp("reliability")
    with open(work / "worker.out", "w") as out, open(work / "worker.err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(WORKER), tiny_corpus.data_prefix,
                                 tiny_corpus.tokenizer_model, str(work),
                                 str(work / "result.json")], env=ENV, stdout=out, stderr=err,
                                text=True, cwd=str(REPO))
    try:
        yield proc, work
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def scenarios(worker):
    proc, work = worker
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out, err = ((work / f"worker.{n}").read_text(errors="replace") for n in ("out", "err"))
    assert proc.returncode == 0, out[-4000:] + err[-8000:]
    return json.loads((work / "result.json").read_text())


# the tests that launch their own processes first: the scenarios' worker runs meanwhile

def _train_cmd(corpus, *extra):
    return [sys.executable, "-m", "megatron_tempnet.train", "--model", "tiny-gpt",
            *corpus.data_flags(), "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--log-interval", "1", "--eval-iters", "0", *extra]


@pytest.mark.usefixtures("worker")  # started: it runs meanwhile
def test_second_run_on_a_locked_save_dir_is_refused(tiny_corpus, tmp_path):
    save = tmp_path / "S"
    first = subprocess.Popen(_train_cmd(tiny_corpus, "--save", str(save), "--train-iters",
                                        "100000", "--save-interval", "100000"), env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=str(REPO))
    try:
        for line in first.stdout:  # wait until it trains
            if line.startswith("iteration"):
                break
        second = subprocess.run(_train_cmd(tiny_corpus, "--save", str(save), "--load",
                                           str(save), "--train-iters", "4"), env=ENV,
                                capture_output=True, text=True, timeout=300, cwd=str(REPO))
    finally:
        first.kill()
        first.wait()
    assert_one_error(second, "is in use by another run", f"pid {first.pid}")
    assert json.loads((save / "exit_status.json").read_text())["reason"] == "running"  # first's


@pytest.mark.usefixtures("worker")  # started: it runs meanwhile
def test_sigterm_during_start_up_exits_with_the_preemption_code(tiny_corpus, tmp_path):
    save = tmp_path / "S"
    proc = subprocess.Popen(_train_cmd(tiny_corpus, "--save", str(save), "--train-iters", "3"),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(REPO))
    time.sleep(1.5)  # importing megatron-core takes longer: the signal lands during start-up
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-2000:] + err[-3000:]
    assert "during start-up" in out or "received SIGTERM" in out, out[-2000:]
    status = json.loads((save / "exit_status.json").read_text())
    assert (status["exit_code"], status["reason"]) == (3, "preempted")


@pytest.mark.parallel
@pytest.mark.usefixtures("worker")
def test_torchrun_bad_input_prints_once_and_records_the_code(tiny_corpus, tmp_path):
    """2 ranks under torchrun (which reports any failure as exit 1): the one line comes from
    rank 0 only, and exit_status.json holds the real code."""
    save = tmp_path / "S"
    # its own sample-index cache: the worker, running meanwhile, trains with the same settings
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "megatron_tempnet.train",
           *_train_cmd(tiny_corpus)[3:], "--data-cache-path", str(tmp_path / "index_cache")]
    ok = subprocess.run(cmd + ["--save", str(save), "--train-iters", "2"], env=ENV,
                        capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert ok.returncode == 0, ok.stderr[-3000:]
    bad = subprocess.run(cmd + ["--save", str(save), "--load", str(save), "--train-iters", "4",
                                "--seq-length", "16"], env=ENV, capture_output=True, text=True,
                         timeout=300, cwd=str(REPO))
    errors = [line for line in (bad.stdout + bad.stderr).splitlines() if "error:" in line
              and "--seq-length" in line]
    assert bad.returncode != 0 and len(errors) == 1, bad.stderr[-4000:]
    # torchrun prints its own ChildFailedError report; no worker prints a traceback
    assert not [line for line in bad.stderr.splitlines()
                if line.startswith("[rank") and "Traceback" in line], bad.stderr[-4000:]
    status = json.loads((save / "exit_status.json").read_text())
    assert (status["exit_code"], status["reason"]) == (2, "bad input")
    assert "--seq-length: checkpoint 32, this run 16" in status["message"]


def one_error(r: dict, *words: str) -> str:
    """The case ended with exit code 2, exactly one error line holding ``words``, no traceback,
    and every checkpoint directory it touched unchanged."""
    assert r["code"] == 2, r
    assert len(r["errors"]) == 1 and not r["traceback"], r
    assert "\n" not in r["errors"][0]
    for word in words:
        assert word in r["errors"][0], (word, r["errors"][0])
    assert r.get("unchanged", True), "a checkpoint directory changed"
    return r["errors"][0]


def test_a_fresh_run_records_its_exit(scenarios):
    assert scenarios["fresh"]["code"] == 0, scenarios["fresh"]
    status = scenarios["fresh_status"]
    assert (status["exit_code"], status["reason"], status["iteration"]) == (0, "done", 4)


@pytest.mark.parametrize("case,words", [
    ("second_fresh_run", ["already holds checkpoints of another run", "iter_0000004",
                          "--load"]),
    ("marker_lost", ["latest_checkpointed_iteration.txt is missing", "refusing to start from "
                     "scratch", "iter_0000004"]),
    ("finetune_into_owned_dir", ["already holds checkpoints of another run", "(--finetune)"]),
    ("resume_into_other_runs_dir", ["belongs to another run", "save into a new directory"]),
    ("finetune_without_load", ["--finetune needs --load"]),
    ("frozen_lm_without_checkpoint", ["--tempnet-training-mode frozen_lm", "holds no checkpoint",
                                      "random weights"]),
    ("lr_changed_on_resume", ["another lr / weight-decay schedule", "--lr: checkpoint 0.0003, "
                              "this run 0.001", "--override-opt-param-scheduler"]),
    ("seq_length_changed_on_resume", ["--seq-length: checkpoint 32, this run 16", "data order",
                                      "--finetune"]),
    ("seed_changed_on_resume", ["--seed: checkpoint 1234, this run 7"]),
    ("tau_bounds_changed_on_resume", ["other TempNet settings", "--tempnet-tau-min: checkpoint "
                                      "0.5, this run 0.2"]),
    ("tau_bounds_changed_in_evaluation", ["--tempnet-tau-min: checkpoint 0.5, this run 0.2"]),
    ("zeroed_shard_train", ["is corrupt", ".distcp", "checksum mismatch"]),
    ("zeroed_shard_evaluate", ["is corrupt", ".distcp"]),
    ("zeroed_shard_export", ["is corrupt", ".distcp"]),
    ("random_bytes_train", ["is corrupt", "common.pt"]),
    ("zeroed_shard_finetune", ["is corrupt"]),
    ("train_iters_zero", ["--train-iters 0: must be an integer >= 1"]),
    ("seq_length_beyond_positions", ["--seq-length 512 exceeds --max-position-embeddings 256",
                                     "lower --seq-length"]),
    ("tp_not_dividing_the_world", ["world size 1 is not divisible by tensor-parallel size 3"]),
    ("nan_blend_weight", ["--data-path weight 'nan'", "positive finite numbers"]),
    ("finetune_mode_without_checkpoint", ["--tempnet-training-mode finetune",
                                          "holds no checkpoint", "random weights"]),
])
def test_bad_input_is_one_line_and_changes_nothing(scenarios, case, words):
    one_error(scenarios[case], *words)


@pytest.mark.parametrize("case", ["second_fresh_run", "resume_into_other_runs_dir"])
def test_a_run_refused_from_another_runs_directory_keeps_its_exit_record(scenarios, case):
    """exit_status.json belongs to the directory's own run: a refused stranger leaves it."""
    assert scenarios[case]["status_kept"]


def test_layout_errors_come_before_any_dataset_index(scenarios):
    assert scenarios["tp_not_dividing_the_world"]["no_index_built"]
    assert scenarios["zeroed_shard_finetune"]["save_absent"]


def test_corrupt_file_is_named_and_export_writes_nothing(scenarios):
    assert scenarios["zeroed_shard_file"] in scenarios["zeroed_shard_train"]["errors"][0]
    assert scenarios["zeroed_shard_export"]["output_absent"]


def test_save_never_deletes_another_runs_directory(scenarios):
    r = scenarios["save_over_foreign_dir"]
    one_error(r, "iter_0000006 exists and was written by another run", "unknown origin",
              "refusing to delete it")
    assert r["foreign_kept"] and r["latest"] == "4"
    kept = scenarios["keep_last_spares_foreign"]
    assert kept["code"] == 0, kept
    assert kept["dirs"] == ["iter_0000001", "iter_0000006"]  # keep-last 1 + the foreign one


def test_schedule_override_and_batch_size_notice(scenarios):
    r = scenarios["override_schedule"]
    assert r["code"] == 0, r
    assert "--override-opt-param-scheduler: this run's schedule" in r["out"]
    assert "iteration      7/7 | lr 1.000e-03" in r["out"]
    r = scenarios["batch_size_changed_on_resume"]
    assert r["code"] == 0, r
    assert "note: --global-batch-size 8 (the checkpoint used 4)" in r["out"]


def test_no_checkpoint_checksums_writes_and_verifies_none(scenarios):
    r = scenarios["no_checksums"]
    assert r["code"] == 0 and r["manifests"] == [], r
    resumed = scenarios["no_checksums_resume"]
    assert resumed["code"] == 0 and "corrupt" not in resumed["out"] + resumed["err"], resumed


def test_time_limit_exit_code_is_written(scenarios):
    assert scenarios["time_limit"]["code"] == 4
    status = scenarios["time_limit_status"]
    assert (status["exit_code"], status["reason"]) == (4, "time limit")


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(scenarios):
    if "disk_full" not in scenarios:
        pytest.skip("needs root to mount a small tmpfs")
    r = scenarios["disk_full"]
    one_error(r, "no space left on the device", "the marker still names iteration 2")
    assert r["latest"] == "2"


def test_collapse_to_uniform_stops_the_run():
    control = RunControl(CheckpointConfig(collapse_patience=3), vocab_size=100)
    ln_v = math.log(100)
    check = lambda it, loss: control._check_collapse(it, loss)  # noqa: E731
    for it in range(1, 6):  # from scratch the loss starts at ln V: no alarm
        check(it, ln_v)
    check(6, 0.5 * ln_v)  # learned
    check(7, ln_v)
    check(8, ln_v * 1.001)
    with pytest.raises(TrainingDiverged, match=r"sat at ln V = 4.6052 .* since iteration 7") as e:
        check(9, ln_v)
    assert e.value.since == 7
    control = RunControl(CheckpointConfig(collapse_patience=0), vocab_size=100)
    for it, loss in enumerate([1.0] + [ln_v] * 50):
        control._check_collapse(it, loss)  # 0: off


def test_a_filesystem_without_locks_is_one_line(tmp_path, monkeypatch):
    """lockf failing with ENOLCK (an NFS / Lustre mount without locks) names the filesystem
    and --no-save-lock, instead of a traceback."""
    import errno

    from megatron_tempnet.config import ConfigError
    from megatron_tempnet.training import save_dir

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(save_dir.fcntl, "lockf", no_locks)
    with pytest.raises(ConfigError, match="no POSIX record locks.*--no-save-lock"):
        save_dir.acquire_lock(tmp_path / "S")
