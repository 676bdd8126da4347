"""One run at a time in a run directory: two would train the same steps beside each other, overwrite
and prune each other's checkpoints, and the second's start would delete the first's FATAL and
FINISHED. Rank 0 holds a lock on `<run.dir>/run.lock` while it lives; the kernel lets it go when the
process ends, a SIGKILL included (on NFS, a crashed host's lock lasts until its lease ends: NFSv4's
90 s; NFSv3's until the host is back). A job of the SLURM scripts (VITDIST_SLURM_JOB) takes it too,
so that a run started by hand in its run.dir is refused, but passes over one that an earlier attempt
of the same job holds: a crashed node's lock on NFS would fail the requeue, which comes sooner.
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
        job = os.environ.get("VITDIST_SLURM_JOB")
        if e.errno in (errno.EACCES, errno.EAGAIN) and job and holder.endswith(f", SLURM job {job}"):
            return (f"run.dir '{run_dir}' is locked by an earlier attempt of this job ({holder}), which its file system "
                    "takes for alive (a crashed node's lock on NFS): this attempt runs without the lock")
        if e.errno in (errno.EACCES, errno.EAGAIN):
            host = re.search(r" on (\S+), since ", holder)
            # Another host's lock outlives that host on NFS: the refusal must say how to get past it.
            crashed = (f" (if {host[1]} is down: NFS keeps a crashed host's lock until its lease ends, NFSv4's in "
                       f"about 90 s, NFSv3's once that host is back; once sure that no run is active there, delete "
                       f"'{run_dir / LOCK}')") if host and host[1] != socket.gethostname() else ""
            raise ConfigError(f"run.dir '{run_dir}' is in use by another run ({holder}): two runs there would "
                              "overwrite each other's checkpoints; give another run.dir, or resume once it has "
                              f"ended{crashed}") from None
        return f"run.dir '{run_dir}': its file system does not lock files ({e.strerror}), so a second run started " \
               "there meanwhile would not be refused"
    os.ftruncate(fd, 0)
    job = f", SLURM job {os.environ['VITDIST_SLURM_JOB']}" if os.environ.get("VITDIST_SLURM_JOB") else ""
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}{job}\n".encode())
    _held.append(fd)
    return None
