"""A real SLURM cluster on this one machine, for tests: ``munged``, ``slurmctld`` and one ``slurmd``
per node (distinct ``NodeName``/``Port``, all at 127.0.0.1), every file in one temporary folder.

Needs Debian's ``slurm-wlm`` and ``munge`` and root (slurmd starts jobs as their user). Nothing
outside the folder is touched: munged gets its own socket and key, slurm.conf points at it.

    cluster = SlurmCluster(nodes=2)
    cluster.start()
    try:
        job = cluster.sbatch("script.sbatch", cwd=...)
        cluster.wait(job, "COMPLETED")
    finally:
        cluster.stop()

``python tests/helpers/slurm_cluster.py`` starts a cluster and keeps it until Enter (for manual tries:
export the printed SLURM_CONF).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def why_unavailable() -> str | None:
    """The reason a local cluster can't run here, or None."""
    missing = [b for b in DAEMONS + CLIENTS if not shutil.which(b, path=SBIN_PATH)]
    if missing:
        return f"SLURM/munge not installed (missing {', '.join(missing)}; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, root: str | None = None):
        # munged insists every folder above its socket is world-executable: not pytest's tmp_path.
        self.root = Path(root or tempfile.mkdtemp(prefix="msmedcap-slurm-"))
        self.root.chmod(0o755)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not an outer job's
        env.update(SLURM_CONF=str(self.conf), PATH=SBIN_PATH)
        self.env = env

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            self._daemon(["slurmctld", "-f", str(self.conf)], self.root / "slurmctld.pid")
            for node in self.nodes:
                self._daemon(["slurmd", "-f", str(self.conf), "-N", node], self.root / f"slurmd-{node}.pid")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, wait for them to end, then stop the daemons by their pid files."""
        if (self.root / "slurmctld.pid").exists():
            self.run("scancel", "--full", "--user", str(os.geteuid()), check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        r = self.root  # slurmd first, munged last
        for pid_file in [*r.glob("slurmd-*.pid"), r / "slurmctld.pid", r / "munge" / "munged.pid"]:
            _stop_pid_file(pid_file, timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ setup
    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(mode=0o755)
        (self.root / "log").mkdir()
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = d / "munge.socket"
        self._daemon(["munged", f"--socket={self.munge_socket}", f"--key-file={key}",
                      f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                      f"--seed-file={d / 'munged.seed'}"], d / "munged.pid")
        out = subprocess.run(f"munge -S {self.munge_socket} -n | unmunge -S {self.munge_socket}",
                             shell=True, capture_output=True, text=True, env=self.env)
        if "Success" not in out.stdout:
            raise RuntimeError(f"munge does not work: {out.stdout}{out.stderr}")

    def _write_conf(self) -> None:
        r = self.root
        for sub in ("state", "spool"):
            (r / sub).mkdir()
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus_per_node} "
            f"RealMemory=2000 State=UNKNOWN" for n, p in zip(self.nodes, node_ports))
        # No systemd, no cgroups: linuxproc tracks a job's processes by parentage.
        self.conf.write_text(f"""\
ClusterName=msmedcap-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=600
{nodes}
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, argv: list, pid_file: Path, timeout: float = 20) -> None:
        """Start a self-daemonising program and wait for its pid file."""
        log = self.root / "log" / f"{pid_file.stem}.stderr"
        with open(log, "w") as err:
            rc = subprocess.run(argv, env=self.env, stdout=err, stderr=err).returncode
        deadline = time.monotonic() + timeout
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if rc != 0 or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(argv)} did not start (rc {rc}):\n{log.read_text()}\n"
                                   f"{self.logs()}")
            time.sleep(0.1)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout}s: {states}\n{self.logs()}")

    # ------------------------------------------------------------------ use
    def run(self, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True, **kw)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out

    def sbatch(self, *args: str, cwd: str | Path, env: dict | None = None) -> str:
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env={**self.env, **(env or {})})
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, RunTime, ...)."""
        text = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_nodes_idle(self, timeout: float = 60) -> None:
        """Until every node is idle: a job started on a node still cleaning up after the previous one
        is killed by slurmctld as "non-startable batch job: Job credential revoked"."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if states and all(s == "idle" for s in states):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes not idle after {timeout} s: {states}")
            time.sleep(0.5)

    def wait(self, job_id: str, until=lambda job: job["JobState"] in FINISHED, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['JobState']} after {timeout}s\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail: int = 30) -> str:
        """The daemons' log tails, for failure messages."""
        parts = []
        for f in sorted((self.root / "log").glob("*")) + sorted((self.root / "munge").glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def _stop_pid_file(pid_file: Path, timeout: float) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:  # a zombie has exited; only its parent can reap it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


if __name__ == "__main__":
    reason = why_unavailable()
    if reason:
        raise SystemExit(reason)
    with SlurmCluster() as c:
        print(f"export SLURM_CONF={c.conf}")
        print(c.run("sinfo", "-N").stdout)
        input("Enter stops the cluster. ")
