"""The loaders' worker processes (training's and validation's): started in sessions of their own
below the training process's priority, watched from the thread that waits for their chunks, and
ended, with the commands they started, when the loader stops.

Watched, because torch notices a dead worker at once only from the main thread (its SIGCHLD
handler), and the training loader runs in DeviceBatches' thread: there torch's one wait of
`timeout` seconds would notice a worker the kernel's OOM killer took only at dist.timeout_s.
Validation's loader, in the main thread, would wait for a stalled read with no end at all.
Ended with their commands, because a `pipe:` command that stalls outlives its worker.

A loader without workers (data.num_workers=0) reads in the training process itself: there a
thread of its own reads it, which the waiting thread gives up on after the timeout, ending the
commands the reads started (vitdist.commands).

Started again, all of them, when one has not started within WORKER_START_S: on a CPython without
the fix for gh-112275 (3.11 got it in September 2024; 3.11.7 lacks it), a child forked while
another thread of the training process creates a Python thread state deadlocks before it runs
any Python. gloo's threads create one whenever they drop the last reference to a tensor that
Python made, so a run that forks a validation loader's workers at each evaluation met this
about once in 560 forks on a busy 2-core machine, and waited dist.timeout_s for a worker that
never started."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.util
import os
import queue
import signal
import threading
import time
from collections import Counter
from multiprocessing import Process, RawArray, connection, parent_process
from typing import Iterator

import torch
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data._utils.signal_handling import _remove_worker_pids

from .commands import Commands
from .distributed import signal_at_parent_death
from .samples import SKIP_KINDS, bad_samples, too_many_skipped

log = logging.getLogger(__name__)

# A worker has no terminal to hang up: this signal, which its parent's death sends, means only that.
PARENT_DIED = signal.SIGHUP
WORKER_NICENESS = 10  # CPU weight about a tenth of the training process's (Linux's CFS weights)
POLL_S = 2.0  # how often a wait for a chunk looks at the workers: a dead one is noticed within this
ENDED_READ_S = 5.0  # for a read whose commands were ended to return (a read the kernel does not interrupt, never)
WORKER_START_S = 15.0  # a fork, then a few calls: well under a second, even on a loaded machine
START_ATTEMPTS = 3


class WorkerDied(RuntimeError):
    """A loader worker exited while the loader still needed it."""


class WorkerStalled(RuntimeError):
    """A loader worker delivered nothing for the loader's timeout."""


class ReadStalled(RuntimeError):
    """A loader without workers, read in the training process, delivered nothing for its timeout."""


class Reads:
    """The samples each worker of a training loader has read, and of them those skipped, by kind,
    in memory the workers share with the thread that waits for their chunks (they are forked after
    it is made). A chunk's own counts travel with the chunk: when none comes for the timeout, these
    tell a read that stalls (retried: it may pass) from shards that are read on but hold almost
    nothing usable, where the stream's barren-shard rule would need every shard read to stop
    (TooManyBadSamples, which a retry would meet again)."""

    def __init__(self, num_workers: int, max_skip_frac: float):
        self.width, self.max_skip_frac = 1 + len(SKIP_KINDS), max_skip_frac
        self.counts = RawArray("q", max(1, num_workers) * self.width)  # one writer per slot: no lock

    def count(self, skipped: str | None, samples: int = 1) -> None:
        """In the worker (or the training process's reading thread): a sample read, skipped as
        `skipped`, standing for `samples` (BadSample.count)."""
        info = get_worker_info()
        start = (info.id if info else 0) * self.width
        self.counts[start] += samples
        if skipped is not None:
            self.counts[start + 1 + SKIP_KINDS.index(skipped)] += samples

    def since(self, before: list[int], worker: int) -> tuple[int, Counter]:
        """What `worker` has read since `before` (a copy of `counts`): the samples, and the skipped ones by kind."""
        now = self.counts[worker * self.width : (worker + 1) * self.width]
        read, *skipped = (n - b for n, b in zip(now, before[worker * self.width :]))
        return read, Counter({kind: n for kind, n in zip(SKIP_KINDS, skipped) if n})


def start_worker(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to the main process: it finishes the step and
    checkpoints, then stops them itself (they would die of the signal and take the step down).
    torchrun and a shell signal the job's process group, which the worker's session leaves it out
    of; SLURM's proctrack/linuxproc (at `scancel --signal`) and systemd (at a stop) signal every
    process of the job, so SIGTERM is taken by a thread of the worker's, which ends it only when
    it comes from the training process (as at its exit: Python's multiprocessing ends the workers
    still running so, and waits for them). Ignoring the signal instead would make the workers
    immune to that one too, and hang the exit; and they leave on their own when the main process
    dies (see below). The worker's own process group also holds the commands it starts (`pipe:`
    shards), so that `watched` ends them with it.

    They also run at a lower priority than the training process. Decoding keeps every core busy
    when there are about as many workers as cores; at equal priority the training process, whose
    threads launch the GPU's work and copy the batches over, then waits for a core behind them, and
    the GPU idles while no batch is late (low data_wait, yet a slower step).

    When the training process dies without a word (SIGKILL: the OOM killer, `kill -9`), the
    worker takes its process group down at once, the commands it started with it: a worker in a
    stalled read would never look for its parent (torch's watchdog does between items), nor would
    its commands. Linux tells it (PR_SET_PDEATHSIG) when the thread that started it ends: the
    training loader's thread (DeviceBatches') ends only once the loader has stopped."""
    os.setsid()
    os.nice(WORKER_NICENESS)
    signal.signal(PARENT_DIED, _end_process_group)
    if signal_at_parent_death(PARENT_DIED) and os.getppid() != parent_process().pid:
        _end_process_group()  # the parent died before the request was in place
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # in the threads started from here on too
    threading.Thread(target=_end_at_sigterm_from_parent, daemon=True, name="sigterm").start()
    # SIGUSR1 asks for a checkpoint, which only the training process takes: the handler inherited
    # from it logged one here ("received SIGUSR1: checkpointing ...") that never came from this process.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _end_at_sigterm_from_parent() -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != os.getppid():
        pass
    _end_process_group()


def _end_process_group(*_) -> None:
    os.killpg(0, signal.SIGKILL)


def data_loader(dataset, num_workers: int, timeout_s: float, **kwargs) -> DataLoader:
    """A DataLoader of `dataset`'s items for `watched`: its workers started by start_worker, and
    each wait of torch's for an item returning after POLL_S at most, to look at the workers (no
    timeout without workers, the only value torch takes then). The workers are forked, whatever
    the process's default start method (forkserver from Python 3.14): start_worker and `_stop` need
    the training process as their parent, and forking needs neither a fresh interpreter per worker
    nor a dataset that pickles."""
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, worker_init_fn=start_worker,
                      timeout=min(POLL_S, timeout_s) if num_workers else 0,
                      multiprocessing_context="fork" if num_workers else None, **kwargs)


def watched(loader: DataLoader, timeout_s: float, name: str, reads: Reads | None = None) -> Iterator:
    """The items of `loader` (made by `data_loader`) until it
    ends, or until a worker exits (WorkerDied, within POLL_S of a wait for a chunk) or delivers
    nothing for `timeout_s` (WorkerStalled; TooManyBadSamples when `reads` shows it read on, skipping
    what it read); `name` ("training", "validation") names the loader in them. Once they stop, for
    any reason (the end, an error, close()), the workers and the commands they started are gone. A
    loader without workers is read in this process, and stopped alike (ReadStalled: see `_read_here`)."""
    if loader.num_workers:
        return _from_workers(loader, timeout_s, name, reads)
    return _read_here(loader, timeout_s, name, reads)


def _from_workers(loader: DataLoader, timeout_s: float, name: str, reads: Reads | None) -> Iterator:
    chunks, workers = _start(loader, timeout_s, name)
    try:
        while True:
            try:
                item = _next(chunks, workers, name, loader.timeout, timeout_s, reads)
            except StopIteration:  # the end of a finite loader (validation's): no generator may raise it
                return
            yield item
    finally:
        _stop(chunks, workers)  # now: an error's traceback would keep the iterator until exit


def _start(loader: DataLoader, timeout_s: float, name: str) -> tuple[Iterator, list[Process]]:
    """`iter(loader)` once every worker has started (see the module's docstring); its workers."""
    start_s = min(WORKER_START_S, timeout_s)
    # Made here, the folder of the sockets that pass tensors is the workers' too, and goes at this
    # process's exit: made by each worker, it stayed in /tmp after `_stop`'s SIGKILL, ranks x workers per start.
    multiprocessing.util.get_temp_dir()
    for attempt in range(1, START_ATTEMPTS + 1):
        chunks = iter(loader)
        workers: list[Process] = chunks._workers
        # Only this thread reports them: torch's SIGCHLD handler, which a loader iterated in the
        # main thread installs (evaluation's), would raise in the main thread, wherever it is.
        _remove_worker_pids(id(chunks))
        chunks._worker_pids_set = False
        deadline = time.monotonic() + start_s
        while (stuck := [i for i, worker in enumerate(workers) if not _started(worker)]) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not stuck:
            return chunks, workers
        for i in stuck:
            workers[i].kill()
        _stop(chunks, workers)
        message = (f"{name} loader worker(s) {', '.join(f'{i} (pid {workers[i].pid})' for i in stuck)} did not start within "
                   f"{start_s:g} s (deadlocked in the fork? see CPython's gh-112275)")
        if attempt < START_ATTEMPTS:
            log.warning("%s: starting the loader's workers again (attempt %d of %d)", message, attempt + 1, START_ATTEMPTS)
    raise WorkerStalled(f"{message}, {START_ATTEMPTS} times")


def _started(worker: Process) -> bool:
    """Whether the worker is past start_worker's setsid, or has exited already (which `_next` reports)."""
    with contextlib.suppress(ProcessLookupError):  # reaped meanwhile
        return not worker.is_alive() or os.getsid(worker.pid) == worker.pid
    return True


def _stop(chunks, workers: list[Process]) -> None:
    """End the workers and their process groups, in place of torch's shutdown. Torch's would wait
    for each worker in turn (one in a stalled read for seconds), and, with the workers ended first,
    could wait for ever: it sets an Event that workers read under a lock they share, and a worker
    ended inside such a read leaves the lock held (torch's SIGCHLD handler, which would interrupt
    that wait, is not in place: see `_from_workers`)."""
    chunks._shutdown = True  # torch's own shutdown, which the iterator's deletion runs, is done here
    if hasattr(chunks, "_pin_memory_thread"):  # as torch does: it reads what the workers send
        chunks._pin_memory_thread_done_event.set()
        chunks._worker_result_queue.put((None, None))
        chunks._pin_memory_thread.join()
    # Each worker's process group: the worker and its commands. A group outlives its leader
    # while a member is left, and its id is not reused meanwhile, so a dead worker's commands
    # end too. SIGKILL, as a worker at a SIGTERM from its parent kills its group itself (start_worker):
    # its commands ignore SIGTERM (vitdist.tars), and a dead worker's would be left reading.
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):  # the worker died and left nothing
            os.killpg(worker.pid, signal.SIGKILL)
    for worker in workers:
        worker.join(timeout=POLL_S)
        if worker.is_alive():  # in a read the kernel does not interrupt
            worker.kill()
    for q in (*chunks._index_queues, chunks._worker_result_queue):
        q.cancel_join_thread()  # nothing sent to a worker, or by one, is awaited any more
        q.close()


def _read_here(loader: DataLoader, timeout_s: float, name: str, reads: Reads | None) -> Iterator:
    """The items of a loader without workers, read in this process by a thread of their own, one
    item at a time as asked for, as the caller would read them itself: torch takes no timeout
    without workers, and only another thread can give up on a read that never returns. A wait of
    `timeout_s` for an item raises ReadStalled, once the commands the reads started (a `pipe:`
    shard's, children of this process) are ended; the thread stays behind only in a read that
    cannot be interrupted, and does not keep the process from exiting."""
    commands = Commands()
    asked, given = queue.SimpleQueue(), queue.SimpleQueue()
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def read():
        commands.record_here()
        if device is not None:
            torch.cuda.set_device(device)  # the caller's: pinned memory belongs to its device's context
        items = iter(loader)
        while asked.get():
            try:
                given.put((next(items), None))
            except BaseException as error:  # the end (StopIteration) too: raised in the caller
                given.put((None, error))
                return

    reader = threading.Thread(target=read, daemon=True, name=f"{name} loader")
    reader.start()
    try:
        while True:
            asked.put(True)
            before = reads.counts[:] if reads else None
            try:
                item, error = given.get(timeout=timeout_s)
            except queue.Empty:
                late = _late(f"{name} loader, read in the training process (data.num_workers=0),", 0, timeout_s,
                             reads, before, ReadStalled, "; the commands it started were ended")  # before they end
                commands.end()
                # Unblocked, the thread goes on to the next shard: it must be done before this process
                # exits, which would freeze it, a daemon, between starting a command and recording it.
                asked.put(False)
                reader.join(timeout=ENDED_READ_S)
                raise late from None
            if isinstance(error, StopIteration):  # the end of a finite loader: no generator may raise it
                return
            if error is not None:
                raise error
            yield item
    finally:
        asked.put(False)  # the thread ends once it is done with the item it reads, if any


def _next(chunks: Iterator, workers: list[Process], name: str, poll_s: float, timeout_s: float, reads: Reads | None):
    started, before = time.monotonic(), reads.counts[:] if reads else None
    while True:
        try:
            return next(chunks)
        except StopIteration:  # the end of a finite loader, no failure
            raise
        except Exception as error:
            polled = str(error) == f"DataLoader timed out after {poll_s} seconds"
            # Torch's own check, after each wait, names only a pid. A worker's death can also break
            # the read of a chunk it sent (a connection reset), a moment before it can be reaped.
            _check(chunks, workers, name, error, grace_s=0 if polled else POLL_S)
            if not polled:
                raise _as_raised(error)
        if time.monotonic() - started >= timeout_s:
            # Torch returns the items in the order it asked for them: it waits for the one asked of this
            # worker (their count no longer tells which once a finite loader's worker is done).
            worker, = chunks._task_info[chunks._rcvd_idx]
            raise _late(f"{name} loader worker {worker} (pid {workers[worker].pid})", worker, timeout_s, reads, before,
                        WorkerStalled, " or a hung worker")


def _as_raised(error: Exception) -> Exception:
    """A vitdist error that a worker raised, as it raised it: torch raises it again with the
    worker's traceback in its message, which the run's one-line error and FATAL then carried.
    Other errors (a bug's, a library's) keep their traceback."""
    kind, text = type(error), str(error)
    raised = f"\n{kind.__module__}.{kind.__qualname__}: "
    if not kind.__module__.startswith("vitdist.") or not text.startswith("Caught ") or raised not in text:
        return error
    return kind(text[text.rindex(raised) + len(raised):].strip())


def _late(who: str, worker: int, timeout_s: float, reads: Reads | None, before: list[int] | None,
          stalled: type[Exception], more: str) -> Exception:
    """The error for `who`, which delivered nothing for `timeout_s`: `stalled`, unless `reads` shows it
    read on, skipping more than data.max_skip_frac of what it read (TooManyBadSamples)."""
    late = f"{who} delivered nothing for {timeout_s:g} s (dist.timeout_s; vitdist evaluate's --timeout-s)"
    read, skipped = reads.since(before, worker) if reads else (None, Counter())
    if read and too_many_skipped(skipped, read, reads.max_skip_frac):
        return bad_samples(f"{late}, reading on: {skipped.total()} of the {read} samples it read meanwhile were bad",
                           skipped, reads.max_skip_frac)
    meanwhile = "" if read is None else f", reading {read} samples meanwhile" if read else ", reading no sample meanwhile"
    return stalled(f"{late}{meanwhile}: a shard read that stalls or crawls (a pipe: command, a filesystem){more}")


def _check(chunks: Iterator, workers: list[Process], name: str, cause: Exception, grace_s: float) -> None:
    """WorkerDied if a worker has exited, or exits within `grace_s`."""
    ended = connection.wait([w.sentinel for i, w in enumerate(workers) if not _done(chunks, i)], timeout=grace_s)
    for worker in workers:
        if worker.sentinel in ended:
            worker.join()  # its sentinel is ready once it is exiting: this reaps it
    dead = [i for i, worker in enumerate(workers) if worker.sentinel in ended and not _done(chunks, i)]
    if dead:
        raise WorkerDied("; ".join(f"{name} loader worker {i} (pid {workers[i].pid}) {_exit_reason(workers[i].exitcode)}"
                                   for i in dead)) from cause


def _done(chunks: Iterator, worker: int) -> bool:
    """Whether the worker has read its share of a finite loader's items, and torch has let it go:
    it exits then, as a dead worker does, but with code 0 (torch lets a dead one go too)."""
    return not chunks._workers_status[worker] and chunks._workers[worker].exitcode == 0


def _exit_reason(exitcode: int) -> str:
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    if -exitcode == signal.SIGKILL:
        return "was killed by SIGKILL (out of memory? the kernel's OOM killer sends it: see `dmesg`)"
    with contextlib.suppress(ValueError):  # a signal Python has no name for
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"was killed by signal {-exitcode}"
