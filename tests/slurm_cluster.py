"""A one-node SLURM cluster on this machine, for the scheduler test tier (tests/test_slurm.py).

munged, slurmctld and slurmd run in the foreground as child processes of the caller, each with its own
configuration, key, socket, ports, state and logs inside one private directory, so several clusters (or a
system SLURM) can run on the same machine side by side; `stop()` ends them by process id. Clients find the
cluster through SLURM_CONF (`Cluster.env`). Needs root (slurmd starts jobs as their submitting user) and
Debian's `slurm-wlm` and `munge` packages.

    python -m tests.slurm_cluster     # bring one up, print its SLURM_CONF, stop it on Enter
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
INSTALL_HINT = "as root: apt-get install -y slurm-wlm munge"


def missing_requirement() -> str | None:
    """Why no cluster can be started here (one line), or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"SLURM tier skipped: {', '.join(absent)} not installed ({INSTALL_HINT})"
    if os.geteuid() != 0:
        return "SLURM tier skipped: slurmd must run as root to start jobs (run the tests as root)"
    return None


def daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on now (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def slurm_conf(root: Path, host: str, cpus: int, memory_mb: int, ports: list[int], socket_path: Path) -> str:
    ctld_port, slurmd_port = ports
    return f"""\
ClusterName=copepl{ctld_port}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=30
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    root: Path
    host: str
    cpus: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The caller's environment, pointed at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def start(self, timeout: float = 60) -> None:
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(mode=0o700, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = self.root / "munge" / "munge.socket"
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
        ports = free_ports(2)
        self.conf.write_text(slurm_conf(self.root, self.host, self.cpus, memory_mb, ports, sock))
        log = open(self.root / "daemons.out", "ab")
        munge = self.root / "munge"
        self.spawn(
            "munged",
            [daemon("munged"), "--foreground", "--force", f"--socket={sock}", f"--key-file={key}"]
            + [f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log", f"--seed-file={munge}/seed"],
            log,
        )
        self.wait_for(lambda: sock.exists(), "munged socket", timeout)
        self.spawn("slurmctld", [daemon("slurmctld"), "-D", "-i", "-f", str(self.conf)], log)
        self.spawn("slurmd", [daemon("slurmd"), "-D", "-f", str(self.conf), "-N", self.host], log)
        self.wait_for(self.node_idle, "the node to become idle", timeout)

    def spawn(self, name: str, cmd: list[str], log) -> None:
        self.processes[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def node_idle(self) -> bool:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}); see {self.root}/daemons.out and *.log")
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10).stdout.strip()
        return out.startswith("idle")

    def wait_for(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"SLURM test cluster: no {what} after {timeout:.0f} s; logs in {self.root}")
            time.sleep(0.5)

    def stop(self) -> None:
        """End the daemons by process id (slurmd first, munged last), SIGKILL where SIGTERM is not enough."""
        for name in reversed(list(self.processes)):
            proc = self.processes[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.processes.clear()


def start_cluster(root: Path | None = None, cpus: int | None = None) -> Cluster:
    """A started cluster in `root` (a fresh temporary directory by default); call .stop() when done."""
    root = Path(root or tempfile.mkdtemp(prefix="cope-pl-slurm-"))
    # At least 2 CPUs, whatever the machine has (config_overrides), so a 2-process job fits on a 1-core runner.
    cluster = Cluster(root=root, host=socket.gethostname().split(".")[0], cpus=cpus or max(2, os.cpu_count() or 1))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


if __name__ == "__main__":
    reason = missing_requirement()
    if reason:
        raise SystemExit(reason)
    cluster = start_cluster()
    print(f"export SLURM_CONF={cluster.conf}")
    try:
        input("cluster up; Enter stops it\n")
    finally:
        cluster.stop()
