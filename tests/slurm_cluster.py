"""A real two-node SLURM cluster on this machine, for the SLURM tests: munged, slurmctld and two
slurmd (node1, node2 at 127.0.0.1), from a slurm.conf generated in one state directory.

`python tests/slurm_cluster.py start|stop|status [--dir D]`, or `Cluster(D).start()` from a test.
Installs nothing (launch/test.sh does, where it may). Starting is idempotent: daemons already
running from D are reused. Stopping ends only the daemons whose pids this helper recorded in D.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel")
NODES = ("node1", "node2")
DEFAULT_DIR = Path(os.environ.get("VITDIST_SLURM_DIR", f"/tmp/vitdist-slurm-{os.getuid()}"))
CTLD_PORT = 16817
NODE_PORTS = (17001, 17002)

SLURM_CONF = """\
ClusterName=vitdist
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again after this many seconds (default 120); long enough
# still for a step's launch on a loaded machine
AuthInfo=socket={dir}/munge.socket,cred_expire=10
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType={proctrack}
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# a job starts about 1 s after submission; a requeued one soon after cred_expire (scheduling every 5 s)
SchedulerParameters=batch_sched_delay=0,bf_interval=5,sched_interval=5
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=15
InactiveLimit=0
MinJobAge=600
NodeName=node[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{port_lo}-{port_hi}] CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
"""

CGROUP_CONF = """\
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=no
ConstrainRAMSpace=no
"""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def _is(pid: int, binary: str) -> bool:
    """Whether pid still runs `binary` (a recorded pid may have been reused since)."""
    try:
        return binary in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False


def _reap(pid: int) -> None:
    """Collect the exit status of a daemon started by this process (else it stays a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class Cluster:
    def __init__(self, state_dir: Path = DEFAULT_DIR):
        self.dir = Path(state_dir)
        self.conf = self.dir / "slurm.conf"
        self.started = False  # by this object: only then does a test's teardown stop it

    @property
    def env(self) -> dict[str, str]:
        """The environment a SLURM client (sbatch, squeue...) needs for this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _pids(self) -> dict[str, int]:
        pids = {}
        for path in self.dir.glob("started-*.pid"):
            pids[path.stem.removeprefix("started-")] = int(path.read_text())
        return pids

    def running(self) -> bool:
        pids = self._pids()
        return (set(pids) == {"munged", "slurmctld", *(f"slurmd-{n}" for n in NODES)}
                and all(_alive(p) for p in pids.values()))

    def start(self, timeout_s: float = 60) -> "Cluster":
        if self.running() and self._nodes_idle(timeout_s=10):
            return self
        self.started = True
        self.stop()
        # A fresh controller: jobs of an earlier one (a requeued job whose processes died with it)
        # would be recovered as running, and hold CPUs that nothing uses.
        shutil.rmtree(self.dir / "state", ignore_errors=True)
        for sub in ("state", "spool/node1", "spool/node2", "munge"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        key = self.dir / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o600)
        proctrack = "proctrack/cgroup" if Path("/sys/fs/cgroup/freezer").is_dir() else "proctrack/linuxproc"
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(SLURM_CONF.format(host=host, dir=self.dir, ctld_port=CTLD_PORT, proctrack=proctrack,
                                               port_lo=NODE_PORTS[0], port_hi=NODE_PORTS[1]))
        (self.dir / "cgroup.conf").write_text(CGROUP_CONF)
        self._spawn("munged", [_exe("munged"), "-F", "-f", f"--socket={self.dir}/munge.socket",
                               f"--key-file={key}", f"--pid-file={self.dir}/munge/munged.pid",
                               f"--log-file={self.dir}/munge/munged.log", f"--seed-file={self.dir}/munge/seed"])
        self._wait(lambda: (self.dir / "munge.socket").exists(), 10, "munged")
        self._spawn("slurmctld", [_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(f"slurmd-{node}", [_exe("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        if not self._nodes_idle(timeout_s):
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in self.dir.glob("*.log"))
            self.stop()
            raise RuntimeError(f"the SLURM cluster in {self.dir} did not come up:\n{logs}")
        return self

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.dir / f"{name}.out", "a")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "SLURM_CONF": str(self.conf)}, start_new_session=True)
        (self.dir / f"started-{name}.pid").write_text(str(process.pid))

    def _wait(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.time() + timeout_s
        while not predicate():
            if time.time() > deadline:
                raise RuntimeError(f"{what} did not start in {timeout_s} s (logs in {self.dir})")
            time.sleep(0.2)

    def _nodes_idle(self, timeout_s: float) -> bool:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if out.returncode == 0 and all(states.get(n) in ("idle", "alloc", "mix") for n in NODES):
                return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        """End the daemons this helper started (by recorded pid), slurmd first, munged last."""
        order = [f"slurmd-{n}" for n in NODES] + ["slurmctld", "munged"]
        pids = self._pids()
        for name in order:
            pid = pids.get(name)
            if pid is not None and _alive(pid) and _is(pid, name.split("-")[0]):
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    _reap(pid)
                    if not _alive(pid):
                        break
                    time.sleep(0.1)
                else:
                    os.kill(pid, signal.SIGKILL)
                    _reap(pid)
            (self.dir / f"started-{name}.pid").unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    if missing_binaries():
        print(f"missing: {', '.join(missing_binaries())}", file=sys.stderr)
        return 1
    cluster = Cluster(args.dir)
    if args.action == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    elif args.action == "stop":
        cluster.stop()
    else:
        print("running" if cluster.running() else "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
