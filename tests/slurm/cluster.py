"""A real single-host SLURM for tests: munged, slurmctld and several slurmd (one per simulated
node, `slurmd -N n1`, each on its own port) started from the system's packages (Debian's
slurm-wlm and munge; .ci/install_slurm.sh installs them), in a private directory with its own
slurm.conf, munge socket and ports, so it can run beside other clusters on the same host.

Partitions (all nodes in each): `low` (default; PreemptMode=REQUEUE, no GraceTime), `grace`
(PreemptMode=REQUEUE, GraceTime) and `high` (a higher PriorityTier: its jobs preempt the
others'). Requeued jobs may start again after cred_expire (a few seconds, not 120).

    python tests/slurm/cluster.py /tmp/slurm-x      # start one by hand; prints SLURM_CONF
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")


def unavailable() -> str | None:
    """Why no cluster can start here (None: it may)."""
    missing = [b for b in BINARIES if shutil.which(b) is None
               and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"SLURM/munge not installed ({', '.join(missing)} missing): run "
                ".ci/install_slurm.sh (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        return "not root: slurmd must run jobs as their user and munged/slurmd need root here"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class Cluster:
    def __init__(self, root: Path, nodes: int = 4, cpus: int = 2, grace_time: int = 60,
                 kill_wait: int = 30):
        self.root = Path(root)
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus, self.grace_time, self.kill_wait = cpus, grace_time, kill_wait
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for key in list(self.env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del self.env[key]

    # -- set-up -------------------------------------------------------------------------------
    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "log", *[f"spool/{n}" for n in self.nodes]):
            (r / d).mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        # job ids (and so the launcher's per-job rendezvous port 20000 + id % 20000) differ
        # from another cluster's on this host; the ports stay below the ephemeral range
        first_job = random.randrange(1000, 12000)
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} "
            f"CPUs={self.cpus} State=UNKNOWN" for n, p in zip(self.nodes, node_ports))
        part = f"Nodes={','.join(self.nodes)} MaxTime=60"
        self.conf.write_text(f"""\
ClusterName=tempnet-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge.sock,cred_expire=5
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
ReturnToService=2
KillWait={self.kill_wait}
MinJobAge=600
MessageTimeout=20
FirstJobId={first_job}
{nodes}
PartitionName=low {part} PriorityTier=1 PreemptMode=REQUEUE Default=YES
PartitionName=grace {part} PriorityTier=1 PreemptMode=REQUEUE GraceTime={self.grace_time}
PartitionName=high {part} PriorityTier=10 PreemptMode=OFF
""")
        key = r / "munge.key"
        system_key = Path("/etc/munge/munge.key")
        key.write_bytes(system_key.read_bytes() if system_key.exists() else os.urandom(1024))
        key.chmod(0o600)

    def _spawn(self, name: str, *cmd: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True)

    def start(self, timeout: float = 60) -> None:
        """Start the daemons and wait for every node to be idle; RuntimeError with the logs'
        last lines if they do not come up."""
        self._write_config()
        r = self.root
        self._spawn("munged", _which("munged"), "--foreground", "--force",
                    f"--socket={r}/munge.sock", f"--key-file={r}/munge.key",
                    f"--pid-file={r}/munged.pid", f"--log-file={r}/log/munged.log",
                    f"--seed-file={r}/munge.seed")
        self._wait(lambda: (r / "munge.sock").exists(), 10, "munged did not create its socket")
        self._spawn("slurmctld", _which("slurmctld"), "-D", "-i", "-f", str(self.conf))
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, 20,
                   "slurmctld does not answer")
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", _which("slurmd"), "-D", "-f", str(self.conf), "-N", node)

        def idle():
            out = self.run("sinfo", "-h", "-N", "-p", "low", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            return len(states) == len(self.nodes) and all(s == "idle" for s in states.values())
        self._wait(idle, timeout, "the nodes did not become idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited: {self.log_tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} within {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, lines: int = 4) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").strip().splitlines()[-lines:]
            if text:
                out.append(f"[{f.name}] " + " | ".join(text))
        return " ".join(out)

    # -- use ----------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True,
                             timeout=kw.pop("timeout", 30), **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()}")
        return out

    def job(self, job_id: str | int) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the job is gone)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id), check=False).stdout
        fields = {}
        for word in out.split():
            key, sep, value = word.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    # -- tear-down ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, wait for them to end, stop the daemons (only the processes this
        cluster started: its daemons, and the slurmstepd/job processes under its spool)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.time() + self.kill_wait + 15
                while time.time() < deadline and self.run(
                        "squeue", "-h", "-o", "%A", check=False).stdout.strip():
                    time.sleep(0.5)
        for name in sorted(self.procs, key=lambda n: n != "munged"):  # munged last
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for pid in self._leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _leftovers(self) -> list[int]:
        """slurmstepd and job processes of this cluster still alive (their working directory
        or an open file under its directory)."""
        root, pids = str(self.root), []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                links = [os.readlink(proc / "cwd")]
                links += [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            except OSError:
                continue
            if any(link.startswith(root + "/") for link in links):
                pids.append(int(proc.name))
        return pids


if __name__ == "__main__":
    cluster = Cluster(Path(sys.argv[1]))
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}")
    print("daemons: " + " ".join(f"{n}={p.pid}" for n, p in cluster.procs.items()))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    try:
        signal.pause()
    finally:
        cluster.stop()
