"""Loader workers that fail as real ones do, under the path training takes (DeviceBatches over a
TrainLoader, iterated in a thread): one SIGKILLed (as by the kernel's OOM killer) stops the
batches within seconds, not at the loader's timeout; a stalled `pipe:` read stops them at the
timeout; either way the workers and the commands they started are gone afterwards. Validation's
loader, which ends, is watched alike."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import (TINY, children, gone, killing, outliving, png_bytes, run_captured, running, still_running,
                      wait_for, write_shard)
from vitdist.config_yaml import load_config
from vitdist.data import EvalLoader, TrainLoader
from vitdist.shard_list import expand_urls
from vitdist.prefetch import DeviceBatches
from vitdist.samples import SKIP_KINDS
from vitdist.workers import Reads, WorkerDied, WorkerStalled

CPU = torch.device("cpu")
TIMEOUT_S = 60  # dist.timeout_s: far above what a dead worker may take to be noticed


def train_loader(shards, *overrides, timeout_s=TIMEOUT_S) -> TrainLoader:
    cfg = load_config(TINY, [f"data.train_shards={shards}", "data.val_shards=null", *overrides])
    return TrainLoader(cfg.data, 32, 8, cfg.train.global_batch_size, 0, 1, timeout_s=timeout_s)


def reading_in_a_process(shards, *overrides, timeout_s=TIMEOUT_S, setup="", **popen) -> subprocess.Popen:
    """A process of its own that runs `setup`, then reads `shards` as training does (through
    DeviceBatches' thread) to its first batch and prints its size, with nothing in this test
    process to clean up after it."""
    return subprocess.Popen([sys.executable, "-c", f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_workers import train_loader
from vitdist.prefetch import DeviceBatches
{setup}
with DeviceBatches(iter(train_loader({shards!r}, *{overrides!r}, timeout_s={timeout_s})), torch.device("cpu")) as batches:
    print(len(next(batches)["label"]))
"""], **popen)


@pytest.mark.parametrize("reads", ["delivering", "stalled"])
def test_a_killed_worker_stops_the_batches_within_seconds_naming_it(demo_shards, tmp_path, reads):
    """SIGKILLed (as the kernel's OOM killer kills) with its chunks queued, or while the loader
    waits for it (its read stalled): the other worker, and the command the dead one left, end too."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    urls = expand_urls(demo_shards["train"])
    shards = urls if reads == "delivering" else [f"pipe:cat {fifo} {url}" for url in urls]
    before = set(children(os.getpid()))

    def started():
        return [pid for pid in children(os.getpid()) if pid not in before]

    with killing(f"cat {fifo} "), DeviceBatches(iter(train_loader(shards, "data.num_workers=2")), CPU) as batches:
        # Until both have started, and, when stalled, are in their reads.
        wait_for(lambda: len(workers := started()) == 2 and (reads == "delivering" or all(map(children, workers))))
        workers = started()
        if reads == "delivering":
            next(batches)
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(WorkerDied) as died:
            while True:  # the batches read before the kill come first
                next(batches)
        noticed_s = time.monotonic() - killed_at
        print(f"noticed {noticed_s:.1f} s after the kill")
        assert noticed_s < 10
        assert re.fullmatch(rf"training loader worker [01] \(pid {victim}\) was killed by SIGKILL \(.*\)", str(died.value))
        assert still_running(f"cat {fifo} ") == [] and all(gone(pid) for pid in workers)


@pytest.mark.parametrize("pipe", ["cat {fifo} {url}", "cat {fifo} {url} | cat"], ids=["command", "pipeline"])
def test_a_stalled_pipe_read_stops_the_batches_at_the_timeout_and_ends_the_command(demo_shards, tmp_path, pipe):
    """A `pipe:` command that never delivers (a FIFO nobody writes): its worker is named, and the
    command, the shell's child (a grandchild of the worker), is gone with it."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    stalled = [f"pipe:{pipe.format(fifo=fifo, url=url)}" for url in expand_urls(demo_shards["train"])]
    loader = train_loader(stalled, "data.num_workers=1", timeout_s=4)
    with killing(f"cat {fifo} "):
        with DeviceBatches(iter(loader), CPU) as batches:
            started = time.monotonic()
            with pytest.raises(WorkerStalled, match=r"^training loader worker 0 \(pid \d+\) delivered nothing for 4 s "):
                next(batches)
            waited_s = time.monotonic() - started
            assert still_running(f"cat {fifo} ") == []
        print(f"stopped {waited_s:.1f} s after the first batch was asked for")
        assert 4 <= waited_s < 4 + 10


@pytest.mark.parametrize("pipe", ["cat {fifo} {url}", "cat {fifo} {url} | cat"], ids=["command", "pipeline"])
def test_a_stalled_read_without_workers_stops_the_training_process_at_the_timeout(demo_shards, tmp_path, pipe):
    """data.num_workers=0: the training process reads its shards itself (in DeviceBatches' thread),
    and a `pipe:` command that never delivers is its own child. The process raises after the
    timeout, naming the loader, and exits with the read still stuck; the command, and a pipeline's
    every command, end with it."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    stalled = [f"pipe:{pipe.format(fifo=fifo, url=url)}" for url in expand_urls(demo_shards["train"])]
    with killing(f"cat {fifo} "):
        training = reading_in_a_process(stalled, "data.num_workers=0", timeout_s=4, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: [pid for pid in running(f"cat {fifo} ") if pid != training.pid], training)  # its script holds the text too
            started = time.monotonic()
            _, stderr = training.communicate(timeout=4 + 20)
            waited_s = time.monotonic() - started
            print(f"exited {waited_s:.1f} s after the read began")
            assert training.returncode == 1 and 4 <= waited_s < 4 + 15, stderr[-3000:]  # its exit, on a loaded machine
            assert re.search(r"ReadStalled: training loader, read in the training process \(data.num_workers=0\), "
                             r"delivered nothing for 4 s ", stderr), stderr[-3000:]
            assert still_running(f"cat {fifo} ") == []
        finally:
            training.kill()
            training.wait()


def test_a_stalled_validation_read_stops_at_the_timeout_naming_its_worker(demo_shards, tmp_path):
    """Worker 0 reads two 1-sample shards and is done (torch lets it exit) long before worker 1,
    which reads a shard of 32 samples in batches of 10, then a `pipe:` shard that never delivers: the finished
    worker is no failure, and the stall names worker 1, although the loader's items have no longer
    come from its workers in turn."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    for i in range(2):
        write_shard(tmp_path / f"one{i}.tar", [{"__key__": f"one{i}", "png": png_bytes((i, 0, 0)), "cls": 0}])
    shards = [str(tmp_path / "one0.tar"), expand_urls(demo_shards["val"])[0], str(tmp_path / "one1.tar"),
              f"pipe:cat {fifo}"]
    cfg = load_config(TINY, [f"data.val_shards={shards}".replace("'", '"'), "data.num_workers=2",
                             "data.micro_batch_size=10"])
    batches = iter(EvalLoader(cfg.data, 32, 8, 0, 1, timeout_s=4))
    with killing(f"cat {fifo}"):
        sizes = [len(next(batches)["key"]) for _ in range(4)]
        started = time.monotonic()
        with pytest.raises(WorkerStalled, match=r"^validation loader worker 1 \(pid \d+\) delivered nothing for 4 s "):
            next(batches)
        waited_s = time.monotonic() - started
        assert sorted(sizes) == [2, 10, 10, 10]  # before the stall: both 1-sample shards, 30 of the 32
        assert 4 <= waited_s < 4 + 5
        assert still_running(f"cat {fifo}") == []


def test_a_worker_that_never_starts_is_killed_and_the_workers_started_again(demo_shards, tmp_path):
    """A forked worker that hangs before it runs any of the worker's code, as a fork beside gloo's
    threads does now and then on CPython 3.11.7 (gh-112275; here the process's first fork is made
    to hang): it is killed once the start timeout is over, and the loader's workers are started
    again, so validation still reads every sample once."""
    marker = tmp_path / "forked"
    run = run_captured([sys.executable, "-c", f"""
import json, logging, os, sys, time
from vitdist.config_yaml import load_config
from vitdist.data import EvalLoader

def hang_the_first_fork():
    try:
        os.close(os.open({str(marker)!r}, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    time.sleep(600)

logging.basicConfig()
os.register_at_fork(after_in_child=hang_the_first_fork)
cfg = load_config({str(TINY)!r}, ["data.val_shards={demo_shards['val']}", "data.num_workers=2"])
print(json.dumps([key for batch in EvalLoader(cfg.data, 32, 8, 0, 1, timeout_s=5) for key in batch["key"]]))
"""], timeout_s=120)
    assert run.returncode == 0, run.stderr
    cfg = load_config(TINY, [f"data.val_shards={demo_shards['val']}", "data.num_workers=2"])
    expected = [key for batch in EvalLoader(cfg.data, 32, 8, 0, 1, timeout_s=5) for key in batch["key"]]
    assert sorted(json.loads(run.stdout)) == sorted(expected) and len(set(expected)) == len(expected) > 0
    stuck = re.search(r"validation loader worker\(s\) 0 \(pid (\d+)\) did not start within 5 s \(.*\): starting the "
                      r"loader's workers again \(attempt 2 of 3\)", run.stderr)
    assert stuck, run.stderr
    assert gone(int(stuck[1]))


def test_workers_are_forked_whatever_the_default_start_method(demo_shards):
    """Python 3.14 makes forkserver the default on Linux: its workers' parent would be the fork
    server, not the training process, and they would take themselves for orphans and exit."""
    reading = reading_in_a_process(demo_shards["train"], "data.num_workers=2",
                                   setup="import multiprocessing; multiprocessing.set_start_method('forkserver')",
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = reading.communicate(timeout=120)
    finally:
        reading.kill()
    assert reading.returncode == 0 and stdout.split() == ["128"], stderr[-3000:]


def test_the_reads_since_a_moment_are_each_workers_own():
    """What tells a stall from shards read on without a usable sample: worker 1's reads, not worker
    0's, which read 100 before."""
    reads = Reads(2, 0.5)
    reads.counts[0] = 100
    before = reads.counts[:]
    reads.counts[reads.width] += 3
    reads.counts[reads.width + 1 + SKIP_KINDS.index("no_label")] += 3
    assert reads.since(before, 1) == (3, Counter(no_label=3)) and reads.since(before, 0) == (0, Counter())


def test_the_workers_leave_no_folder_in_tmp(demo_shards, tmp_path):
    """Each worker made a /tmp/pymp-* folder for the sockets that pass tensors, which the SIGKILL that
    ends it left behind: ranks x workers folders at every start, for good."""
    reading = reading_in_a_process(demo_shards["train"], "data.num_workers=2", stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        stdout, stderr = reading.communicate(timeout=120)
    finally:
        reading.kill()
    assert reading.returncode == 0 and stdout.split() == ["128"], stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_a_killed_validation_worker_stops_the_evaluation_within_seconds(demo_shards, tmp_path):
    """Validation's loader is read in the main thread, while both its workers wait in stalled reads:
    one SIGKILLed is named within seconds, not at the timeout, and the commands end."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    shards = [f"pipe:cat {fifo} {url}" for url in expand_urls(demo_shards["val"])]
    cfg = load_config(TINY, [f"data.val_shards={shards}".replace("'", '"'), "data.num_workers=2"])
    before, killed = set(children(os.getpid())), []

    def kill_a_worker_in_its_read():
        while not (reading := [pid for pid in children(os.getpid()) if pid not in before and children(pid)]):
            time.sleep(0.1)
        os.kill(reading[0], signal.SIGKILL)
        killed.extend([reading[0], time.monotonic()])

    killer = threading.Thread(target=kill_a_worker_in_its_read, daemon=True)
    killer.start()
    with killing(f"cat {fifo} "):
        with pytest.raises(WorkerDied) as died:
            next(iter(EvalLoader(cfg.data, 32, 8, 0, 1, timeout_s=TIMEOUT_S)))
        victim, killed_at = killed
        assert time.monotonic() - killed_at < 10
        assert re.fullmatch(rf"validation loader worker [01] \(pid {victim}\) was killed by SIGKILL \(.*\)",
                            str(died.value))
        assert still_running(f"cat {fifo} ") == []


def test_workers_and_their_commands_end_when_the_training_process_is_sigkilled(demo_shards, tmp_path):
    """The training process, reading its loader as training does (through DeviceBatches' thread),
    is SIGKILLed while its workers wait in stalled `pipe:` reads (the OOM killer, `kill -9`): nothing
    in it cleans up, yet the workers and every command of their pipelines end within seconds."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    stalled = [f"pipe:cat {fifo} {url} | cat" for url in expand_urls(demo_shards["train"])]
    def commands():
        return [pid for worker in children(training.pid) for shell in children(worker) for pid in (shell, *children(shell))]

    with killing(f"cat {fifo} "):
        training = reading_in_a_process(stalled, "data.num_workers=2")
        try:
            # Until both workers wait in their reads: each with a shell that has forked both commands.
            wait_for(lambda: len(commands()) == 6, training)
            workers, started = children(training.pid), commands()
            training.kill()
            killed_at = time.monotonic()
            left = outliving([*workers, *started], wait_s=10)
            print(f"ended {time.monotonic() - killed_at:.1f} s after the kill")
            assert left == []
        finally:
            training.kill()
            training.wait()


def test_a_sigterm_or_sigusr1_from_another_process_leaves_the_workers_reading(demo_shards):
    """At a preemption SLURM's proctrack/linuxproc signals every process of the job step, the
    workers in their own sessions too (slurm/common.sh's `scancel --signal=TERM`, sbatch's
    `--signal=USR1@T` without `B:`), as systemd's KillMode=control-group does at a stop: the
    workers read on past what they had read ahead, so that the training process can finish its
    steps and checkpoint. The training process's own SIGTERM (multiprocessing sends it, at exit,
    to workers left running) still ends them."""
    before = set(children(os.getpid()))
    batches = iter(train_loader(demo_shards["train"], "data.num_workers=2", "data.prefetch_steps=1"))
    next(batches)
    workers = [pid for pid in children(os.getpid()) if pid not in before]
    subprocess.run(["kill", "-TERM", *map(str, workers)], check=True)  # another process than their parent
    subprocess.run(["kill", "-USR1", *map(str, workers)], check=True)
    for _ in range(8):  # two epochs of the demo shards, far past a step read ahead
        next(batches)
    assert not any(map(gone, workers))
    os.kill(workers[0], signal.SIGTERM)
    assert outliving(workers[:1]) == []
    batches.close()
    assert outliving(workers) == []
