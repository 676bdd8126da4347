"""One run at a time in a run directory: two would train the same steps beside each other, overwrite
and prune each other's checkpoints, and the second's start would delete the first's FATAL and
FINISHED. Rank 0 holds a lock on `<run.dir>/run.lock` while it lives; the kernel lets it go when the
process ends, a SIGKILL included, so a restart or a resume never finds a stale one."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from .config import ConfigError

LOCK = "run.lock"
_held: list[int] = []  # the lock's file descriptor, open while this process lives


def hold(run_dir: Path, keep: bool = True) -> str | None:
    """Take the run directory's lock for this process, or refuse (ConfigError) naming the process
    that holds it. A file system without locks (some Lustre and NFS mounts) is no refusal: the
    warning it returns says so. Without `keep` (`--check`), only see whether another run holds it:
    nothing is written, the directory not made."""
    lock = run_dir / LOCK
    if not keep and not lock.exists():
        return None
    try:
        if keep:
            run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if keep else 0), 0o644)
    except OSError as e:  # refused on every rank together, not one rank's traceback while the others wait
        raise ConfigError(f"run.dir '{run_dir}' cannot be written: {e}") from None
    try:
        # A POSIX record lock, not flock(): its owner is this process alone, not the loader workers
        # it forks (which would hold it on after a SIGKILL), and NFS carries it to other hosts.
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 1000).decode(errors="replace").strip() or "a process that has not said which"
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise ConfigError(f"run.dir '{run_dir}' is in use by another run ({holder}): two runs there would "
                              "overwrite each other's checkpoints; give another run.dir, or resume once it has "
                              "ended") from None
        return f"run.dir '{run_dir}': its file system does not lock files ({e.strerror}), so a second run started " \
               "there meanwhile would not be refused"
    if not keep:
        os.close(fd)  # which lets the lock go
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    _held.append(fd)
    return None
