"""The slurm/*.sh scripts under a real SLURM (22.05 from Debian's slurm-wlm, munge), started on
this host by tests/slurm/cluster.py: slurmctld and four slurmd as nodes n1-n4, partitions `low`
(PreemptMode=REQUEUE), `grace` (REQUEUE with GraceTime) and `high` (preempts both).

The project's own script (slurm/pretrain_llama7b_tempnet.sh) runs the tiny LLaMA smoke config
on the CPU (gloo, one process per node, TP=1; the header's GPUs and node count overridden on
the sbatch command line), all cases at once:
  R  uninterrupted: the reference losses; completes.
  B  `scancel --batch --signal=USR1` (what the time-limit signal does): saves, requeues itself,
     the next attempt resumes and logs the same losses as R (exact resume).
  C  preempted by a `high` job, no GraceTime: SIGTERM to every step and the batch shell, the
     trainer saves, SLURM requeues the job, the next attempt resumes (same losses).
  D  preempted in `grace`: SIGTERM to the job step only; the trainer saves and exits 3, the
     batch shell reads that from exit_status.json and requeues (same losses).
  E  a plain `scancel`: the trainer saves, the job ends CANCELLED, not requeued; E2, a second
     sbatch of the same command, resumes from E's checkpoint and completes (same losses).
  F  a 2-node job (two slurmd on this host, a c10d rendezvous across them): completes.
Where the daemons cannot start (not installed, not root) the tests skip and say why
(TEMPNET_REQUIRE_SLURM=1 makes that a failure, for CI; TEMPNET_KEEP_SLURM=1 keeps the cluster's
directory, logs included). About 2.5 minutes on 2 cores.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slurm"))
from cluster import Cluster, unavailable  # noqa: E402

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "slurm/pretrain_llama7b_tempnet.sh"
ITERS = 80
FLAGS = ["--lr-decay-style", "constant", "--tensor-model-parallel-size", "1",
         "--train-iters", str(ITERS), "--save-interval", "1000"]
DEADLINE_S = 480  # the whole scenario; about 3 minutes on 2 idle cores
DONE = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
        "OUT_OF_MEMORY", "DEADLINE"}
ITERATION = re.compile(r"^iteration +(\d+)/ *\d+ \|.*?\| lm loss ([0-9.]+) \|.*?"
                       r"\| dro loss ([0-9.]+) \|.*?\| grad norm ([0-9.]+)", re.M)


def _skip_or_fail(why: str):
    if os.environ.get("TEMPNET_REQUIRE_SLURM") == "1":
        pytest.fail(f"TEMPNET_REQUIRE_SLURM=1 but {why}")
    pytest.skip(why)


@dataclass
class Job:
    name: str
    partition: str = "low"
    nodes: int = 1
    ckpt: str = ""  # default: its own
    id: str = ""
    acted: bool = False
    info: dict = field(default_factory=dict)

    def dirs(self, root: Path) -> tuple[Path, Path]:
        base = root / "jobs"
        return base / (self.ckpt or self.name) / "ckpt", base / self.name / "logs"

    def attempts(self, root: Path) -> list[str]:
        logs = sorted(self.dirs(root)[1].glob("attempt-*.log"),
                      key=lambda p: int(p.stem.split("-")[1]))
        return [p.read_text(errors="replace") for p in logs]

    def output(self, root: Path) -> str:
        path = root / "jobs" / self.name / "job.out"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def state(self) -> str:
        return self.info.get("JobState", "")


def _losses(text: str) -> dict[int, tuple[str, str, str]]:
    return {int(m[1]): (m[2], m[3], m[4]) for m in ITERATION.finditer(text)}


class Scenario:
    def __init__(self, cluster: Cluster, corpus):
        self.c, self.root = cluster, cluster.root
        self.corpus = corpus
        self.jobs = {j.name: j for j in (Job("b"), Job("c"), Job("d", "grace"), Job("e"),
                                         Job("r"), Job("f", nodes=2))}
        self.preemptors: list[str] = []

    def submit(self, job: Job) -> None:
        ckpt, logs = job.dirs(self.root)
        logs.mkdir(parents=True, exist_ok=True)
        env = dict(self.c.env, RUN_CONFIG="configs/runs/tiny-llama-tempnet-smoke.yaml",
                   DATA_PATH=self.corpus.data_prefix, TOKENIZER_MODEL=self.corpus.tokenizer_model,
                   CHECKPOINT_DIR=str(ckpt), LOG_DIR=str(logs), NPROC="1", OMP_NUM_THREADS="1",
                   PYTHON=sys.executable, SHUTDOWN_TIMEOUT="60")
        for key in ("CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE",
                    "LOG_ROOT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(key, None)
        out = self.c.run("sbatch", "--parsable", "-J", job.name, "-p", job.partition,
                         f"--nodes={job.nodes}", "--gpus-per-node=0", "--cpus-per-task=1",
                         "--time=15", f"--chdir={REPO}",
                         f"--output={self.root}/jobs/{job.name}/job.out", SCRIPT, *FLAGS,
                         env=env, cwd=REPO)
        job.id = out.stdout.strip().split(";")[0]

    def preempt(self, job: Job) -> None:
        node = job.info.get("NodeList", "")
        out = self.c.run("sbatch", "--parsable", "-J", f"preempt-{job.name}", "-p", "high",
                         "-w", node, "--exclusive", "--time=2", "-o", "/dev/null",
                         "--wrap", "sleep 2")
        self.preemptors.append(out.stdout.strip())

    def started_training(self, job: Job) -> bool:
        attempts = job.attempts(self.root)
        return bool(attempts) and "iteration      1/" in attempts[0]

    def run(self) -> None:
        for name in ("b", "c", "d", "e", "r", "f"):  # the ones to interrupt first
            self.submit(self.jobs[name])
        deadline = time.time() + DEADLINE_S
        while time.time() < deadline:
            for job in list(self.jobs.values()):
                job.info = self.c.job(job.id)
            b, c, d, e = (self.jobs[n] for n in "bcde")
            for job in (b, c, d, e):
                if not job.acted and job.state == "RUNNING" and self.started_training(job):
                    job.acted = True
                    if job is b:
                        self.c.run("scancel", "--batch", "--signal=USR1", job.id)
                    elif job is e:
                        self.c.run("scancel", job.id)
                    else:
                        self.preempt(job)
            if e.state == "CANCELLED" and "e2" not in self.jobs:
                self.jobs["e2"] = Job("e2", ckpt="e")
                self.submit(self.jobs["e2"])  # the same command again: resumes
            if "e2" in self.jobs and all(j.state in DONE for j in self.jobs.values()):
                return
            time.sleep(0.5)
        states = {n: (j.id, j.state, j.info.get("Restarts")) for n, j in self.jobs.items()}
        tails = {n: (j.attempts(self.root) or [""])[-1][-1500:] for n, j in self.jobs.items()}
        pytest.fail(f"the jobs did not end within {DEADLINE_S}s: {states}\n{tails}\n"
                    f"{self.c.log_tail()}")


@pytest.fixture(scope="module")
def scenario(tiny_corpus):
    why = unavailable()
    if why:
        _skip_or_fail(why)
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))  # short: unix socket paths
    cluster = Cluster(root, nodes=4, grace_time=60, kill_wait=30)
    try:
        try:
            cluster.start()
        except (RuntimeError, OSError) as e:
            _skip_or_fail(f"the SLURM daemons did not start here: {e}")
        s = Scenario(cluster, tiny_corpus)
        s.run()
        yield s
    finally:
        cluster.stop()
        if os.environ.get("TEMPNET_KEEP_SLURM") != "1":  # 1: keep logs and configuration
            shutil.rmtree(root, ignore_errors=True)


def _job(s: Scenario, name: str) -> tuple[Job, list[str], str]:
    job = s.jobs[name]
    return job, job.attempts(s.root), job.output(s.root)


def _same_losses_as_the_reference(s: Scenario, attempts: list[str]) -> None:
    """Every logged iteration, over all attempts, equals the uninterrupted run's; together
    they cover 1..ITERS and the resumed attempt retrains nothing."""
    ref = _losses(s.jobs["r"].attempts(s.root)[0])
    assert sorted(ref) == list(range(1, ITERS + 1))
    seen: dict[int, tuple] = {}
    for text in attempts:
        losses = _losses(text)
        assert not set(losses) & set(seen), "an iteration trained twice"
        seen.update(losses)
    assert sorted(seen) == list(range(1, ITERS + 1))
    assert seen == ref


def _resumed(text: str) -> int:
    m = re.search(r"checkpoint: resume from \S+ \(iteration (\d+)\)", text)
    assert m, text[:2000]
    return int(m[1])


def test_completion_and_resume(scenario):
    """R completes; E2 (a second sbatch of E's command) resumes from E's checkpoint."""
    r, attempts, _ = _job(scenario, "r")
    assert r.state == "COMPLETED" and r.info["Restarts"] == "0", r.info
    assert len(attempts) == 1 and "[launch] finished" in attempts[0]
    assert "commit " in attempts[0].splitlines()[0]  # the revision in each attempt's log
    e2, attempts2, _ = _job(scenario, "e2")
    assert e2.state == "COMPLETED", e2.info
    assert _resumed(attempts2[0]) >= 1 and "[launch] finished" in attempts2[0]
    _same_losses_as_the_reference(scenario, scenario.jobs["e"].attempts(scenario.root)
                                  + attempts2)


def test_usr1_requeue_and_exact_resume(scenario):
    b, attempts, out = _job(scenario, "b")
    assert b.state == "COMPLETED" and b.info["Restarts"] == "1", b.info
    assert len(attempts) == 2
    assert "got SIGUSR1" in attempts[0] and f"requeueing job {b.id}" in attempts[0]
    assert _resumed(attempts[1]) >= 1 and "[launch] finished" in attempts[1]
    _same_losses_as_the_reference(scenario, attempts)
    assert "[launch] finished" in out  # the job's output has the attempts too


def test_preemption_without_gracetime(scenario):
    """SIGTERM to everything: the trap sees Restarts moved on (SLURM requeues); the trainer
    saved; the attempt's last lines survive the SIGTERM to the batch step."""
    c, attempts, out = _job(scenario, "c")
    assert c.state == "COMPLETED" and int(c.info["Restarts"]) >= 1, c.info
    first = attempts[0]
    assert "SLURM requeues the job (preemption or scontrol requeue)" in first
    assert "saved checkpoint" in first and "SLURM requeues the job itself" in first
    assert "DUE TO PREEMPTION" in out
    after = out[out.index("DUE TO PREEMPTION"):]
    assert "saved checkpoint" in after, out[-3000:]  # the tail outlived the SIGTERM
    assert _resumed(attempts[-1]) >= 1
    _same_losses_as_the_reference(scenario, attempts)


def test_preemption_with_gracetime(scenario):
    """GraceTime: SIGTERM reaches the job step only; torchrun dies of it, the trainer's
    exit_status.json (this attempt's) says 3 and the batch shell requeues."""
    d, attempts, _ = _job(scenario, "d")
    assert d.state == "COMPLETED" and d.info["Restarts"] == "1", d.info
    first = attempts[0]
    assert "got SIGTERM" not in first  # the batch shell was not signalled
    assert "exit code 3 (from exit_status.json)" in first
    assert f"requeueing job {d.id}" in first
    _same_losses_as_the_reference(scenario, attempts)


def test_scancel_stops_the_job(scenario):
    e, attempts, _ = _job(scenario, "e")
    assert e.state == "CANCELLED" and e.info["Restarts"] == "0", e.info
    assert len(attempts) == 1
    assert "SIGTERM: cancelled" in attempts[0] and "not requeued" in attempts[0]
    assert "saved checkpoint" in attempts[0]  # saved within KillWait
    assert "requeueing" not in attempts[0]


def test_two_node_job(scenario):
    f, attempts, _ = _job(scenario, "f")
    assert f.state == "COMPLETED" and f.info["NumNodes"].startswith("2"), f.info
    assert "nnodes=2 nproc_per_node=1" in attempts[0]
    assert f"iteration {ITERS:6d}/{ITERS}" in attempts[0] and "[launch] finished" in attempts[0]
    assert "(TP=1 PP=1 DP=2)" in attempts[0]
