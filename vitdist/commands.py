"""The commands that shard reads start (`pipe:` shards, webdataset's curl for http:), recorded
per reading thread, so that another thread can end them when those reads stall.

A loader worker's commands end with its process group (vitdist.workers). Without workers
(data.num_workers=0) the commands are children of the training process itself, in its process
group, and would outlive it in a stalled read: they are ended one by one, with their own children
(a pipeline's every command)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import weakref
from pathlib import Path
from subprocess import Popen

_recording = threading.local()
_every: weakref.WeakSet[Commands] = weakref.WeakSet()


class ReadsEnded(RuntimeError):
    """A shard read started in a thread whose reads were given up on (Commands.end)."""


class Commands:
    """The open commands of the reads in the threads that `record_here` it. After `end`, every
    command open is ended, and a read that starts one after raises ReadsEnded, its command ended:
    the thread, unblocked, must not go on to the next shard and stall there, unseen."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: set[Popen] = set()
        self._ended = False
        _every.add(self)

    def record_here(self) -> None:
        """Record the commands that reads in the calling thread start."""
        _recording.commands = self

    def end(self) -> None:
        with self._lock:
            self._ended = True
            commands = list(self._open)
        for command in commands:
            end_command(command.pid)

    def _add(self, command: Popen) -> None:
        with self._lock:
            if not self._ended:
                self._open.add(command)
                return
        end_command(command.pid)
        raise ReadsEnded("the reads of this loader were given up on")

    def _discard(self, command: Popen) -> None:
        with self._lock:
            self._open.discard(command)


def end_all() -> None:
    """End the reads of every loader read in this process (Commands.end), where it gives up on them."""
    for commands in list(_every):
        commands.end()


@contextlib.contextmanager
def recorded(commands: list[Popen]):
    """While a read has `commands` open, in a thread that records them (see Commands)."""
    recorder: Commands | None = getattr(_recording, "commands", None)
    if recorder is None:
        yield
        return
    added = []
    try:
        for command in commands:
            recorder._add(command)
            added.append(command)
        yield
    finally:
        for command in added:
            recorder._discard(command)


def end_command(pid: int) -> None:
    """SIGKILL a command and every process below it (a shell's pipeline). Each is stopped before
    its children are listed, so that none starts another unseen. Linux lists them (/proc's
    `children`); elsewhere only the command itself is ended."""
    tree, new = set(), {pid}
    while new:
        for member in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGSTOP)
        tree |= new
        new = {child for member in new for child in _children(member)} - tree
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()]
    except OSError:  # gone, or no /proc
        return []
