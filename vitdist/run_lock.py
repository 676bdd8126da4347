"""One run at a time in a run directory: two would train the same steps beside each other, overwrite
and prune each other's checkpoints, and the second's start would delete the first's FATAL and
FINISHED. Rank 0 holds a lock on `<run.dir>/run.lock` while it lives; the kernel lets it go when the
process ends, a SIGKILL included (on NFS, a crashed host's lock lasts until its lease ends: NFSv4's
90 s; NFSv3's until the host is back). A job of the SLURM scripts (VITDIST_SLURM_JOB) takes it too,
in its config check and its rank 0, so that a run started by hand in its run.dir is refused, but
passes over one that an earlier attempt of the same job holds on another host: a crashed node's lock
on NFS would fail the requeue, which comes sooner (and once the lease ends, nothing holds the lock).
slurm/common.sh also refuses a second job while squeue lists the first, queued ones too."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import time
from pathlib import Path

from .config import ConfigError

LOCK = "run.lock"
_held: list[int] = []  # the lock's file descriptor, open while this process lives


def hold(run_dir: Path) -> str | None:
    """Take the run directory's lock for this process, or refuse (ConfigError) naming the process
    that holds it. A file system that refuses locks is no refusal: the warning it returns says so."""
    job = os.environ.get("VITDIST_SLURM_JOB")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:  # refused on every rank together, not one rank's traceback while the others wait
        raise ConfigError(f"run.dir '{run_dir}' cannot be written: {e}") from None
    try:
        # A POSIX record lock, not flock(): its owner is this process alone, not the loader workers
        # it forks (which would hold it on after a SIGKILL), and NFS carries it to other hosts.
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 1000).decode(errors="replace").strip() or "a process that has not said which"
        os.close(fd)
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            return f"run.dir '{run_dir}': its file system does not lock files ({e.strerror}), so a second run " \
                   "started there meanwhile would not be refused"
        host = re.search(r" on (\S+), since ", holder)
        # This host's locks end with their processes: only another host's can be a crashed one's,
        # which NFS keeps (as it keeps a host's that is cut off from the network, alive).
        elsewhere = host is not None and host[1] != socket.gethostname()
        if elsewhere and job and holder.endswith(f", SLURM job {job}"):
            return (f"run.dir '{run_dir}' is locked by an earlier attempt of this job ({holder}), which its file system "
                    "takes for alive (a crashed node's lock on NFS): this attempt runs without the lock")
        crashed = (f" (if {host[1]} is down: NFS keeps a crashed host's lock until its lease ends, NFSv4's in about "
                   f"90 s, NFSv3's once that host is back; once sure that no run is active there, delete "
                   f"'{run_dir / LOCK}')") if elsewhere else ""
        raise ConfigError(f"run.dir '{run_dir}' is in use by another run ({holder}): two runs there would overwrite "
                          f"each other's checkpoints; give another run.dir, or resume once it has ended{crashed}") from None
    os.ftruncate(fd, 0)
    said = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    os.write(fd, f"{said}, SLURM job {job}\n".encode() if job else f"{said}\n".encode())
    _held.append(fd)
    return None
