"""Loader workers that fail as real ones do, under the path training takes (DeviceBatches over a
TrainLoader, iterated in a thread): one SIGKILLed (as by the kernel's OOM killer) stops the
batches within seconds, not at the loader's timeout; a stalled `pipe:` read stops them at the
timeout; either way the workers and the commands they started are gone afterwards."""

import os
import re
import signal
import time

import pytest
import torch

from conftest import TINY, children, gone, running
from vitdist.config_yaml import load_config
from vitdist.data import TrainLoader, expand_urls
from vitdist.prefetch import DeviceBatches
from vitdist.workers import WorkerDied, WorkerStalled

CPU = torch.device("cpu")
TIMEOUT_S = 60  # dist.timeout_s: far above what a dead worker may take to be noticed


def train_loader(shards, *overrides, timeout_s=TIMEOUT_S) -> TrainLoader:
    cfg = load_config(TINY, [f"data.train_shards={shards}", "data.val_shards=null", *overrides])
    return TrainLoader(cfg.data, 32, 8, cfg.train.global_batch_size, 0, 1, timeout_s=timeout_s)


@pytest.mark.parametrize("reads", ["delivering", "stalled"])
def test_a_killed_worker_stops_the_batches_within_seconds_naming_it(demo_shards, tmp_path, reads):
    """SIGKILLed (as the kernel's OOM killer kills) with its chunks queued, or while the loader
    waits for it (its read stalled): the other worker, and the command the dead one left, end too."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    urls = expand_urls(demo_shards["train"])
    shards = urls if reads == "delivering" else [f"pipe:cat {fifo} {url}" for url in urls]
    before = set(children(os.getpid()))
    try:
        with DeviceBatches(iter(train_loader(shards, "data.num_workers=2")), CPU) as batches:
            workers = []
            while len(workers) < 2 or (reads == "stalled" and not all(children(pid) for pid in workers)):
                time.sleep(0.1)  # until both have started, and, when stalled, are in their reads
                workers = [pid for pid in children(os.getpid()) if pid not in before]
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
            assert re.fullmatch(rf"loader worker [01] \(pid {victim}\) was killed by SIGKILL \(.*\)", str(died.value))
            assert running(f"cat {fifo} ") == [] and all(gone(pid) for pid in workers)
    finally:
        for pid in running(f"cat {fifo} "):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("pipe", ["cat {fifo} {url}", "cat {fifo} {url} | cat"], ids=["command", "pipeline"])
def test_a_stalled_pipe_read_stops_the_batches_at_the_timeout_and_ends_the_command(demo_shards, tmp_path, pipe):
    """A `pipe:` command that never delivers (a FIFO nobody writes): its worker is named, and the
    command, the shell's child (a grandchild of the worker), is gone with it."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    stalled = [f"pipe:{pipe.format(fifo=fifo, url=url)}" for url in expand_urls(demo_shards["train"])]
    loader = train_loader(stalled, "data.num_workers=1", timeout_s=4)
    try:
        with DeviceBatches(iter(loader), CPU) as batches:
            started = time.monotonic()
            with pytest.raises(WorkerStalled, match=r"^loader worker 0 \(pid \d+\) delivered nothing for 4 s "):
                next(batches)
            waited_s = time.monotonic() - started
            assert running(f"cat {fifo} ") == []
        print(f"stopped {waited_s:.1f} s after the first batch was asked for")
        assert 4 <= waited_s < 4 + 10
    finally:
        for pid in running(f"cat {fifo} "):
            os.kill(pid, signal.SIGKILL)
