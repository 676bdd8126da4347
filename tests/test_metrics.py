"""The perf/ figures: the matmul peak perf/mfu divides by, the time a log window lasts, and the
share of it spent waiting for data."""

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import background_pretrain, read_scalars, run_pretrain, shard_overrides, wait_for
from vitdist import metrics
from vitdist.distributed import DistContext
from vitdist.metrics import MetricLogger, matmul_peak_flops
from vitdist.shard_list import expand_urls
from vitdist.train import Window, _close_window
from vitdist.train_state import TrainState


def test_the_cpu_peak_is_measured_alike_while_other_processes_load_the_cores():
    """Other jobs on a shared machine's cores slow the products down; the peak measured meanwhile
    must still be the cores' own, or perf/mfu reads high (a run once logged 150%). Here two busy
    processes on every core, as another job's ranks and loader workers would be (timed by the
    clock, the peak read 0.43x of the one alone in 2 of 3 tries)."""
    alone = matmul_peak_flops(torch.device("cpu"), torch.float32)
    hogs = [subprocess.Popen([sys.executable, "-c", "print('looping', flush=True)\nwhile True: pass"],
                             stdout=subprocess.PIPE, text=True) for _ in 2 * [*os.sched_getaffinity(0)]]
    try:
        for hog in hogs:
            assert hog.stdout.readline() == "looping\n"  # past its interpreter's start, in its loop
        loaded = matmul_peak_flops(torch.device("cpu"), torch.float32)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
            hog.stdout.close()
    assert loaded > 0.7 * alone, (loaded / 1e9, alone / 1e9)


def test_the_cpu_peak_is_not_below_what_a_bf16_linear_layer_reaches():
    """perf/mfu divides by the peak, so the model's own layers must not run faster than it. On a CPU
    without bf16 instructions a bf16 linear layer (under autocast, as training runs) takes oneDNN's
    kernels, about 5x faster than the plain bf16 matrix product the peak was timed on: runs with
    train.precision=bf16 on a CPU logged perf/mfu of 170-260%."""
    per_thread = matmul_peak_flops(torch.device("cpu"), torch.bfloat16) / torch.get_num_threads()
    x, weight = torch.randn(8 * 197, 768), torch.randn(3072, 768)  # a ViT-B MLP's first layer, 8 images
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.autocast("cpu", torch.bfloat16):
            torch.nn.functional.linear(x, weight)
            start = time.thread_time()
            torch.nn.functional.linear(x, weight)
            layer = 2 * x.shape[0] * 768 * 3072 / (time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    assert layer < 1.25 * per_thread, (layer / 1e9, per_thread / 1e9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="only a GPU runs behind the host")
def test_a_log_window_ends_when_the_gpu_has_run_its_steps(process_group):
    """The host queues steps ahead of the GPU (nothing in a step waits for it): a window timed
    until the host has queued its last step would count images the GPU has not yet trained on."""
    ctx = DistContext(rank=0, world_size=1, device=torch.device("cuda"))
    zero = torch.zeros((), device=ctx.device)
    torch.cuda.synchronize()
    window = Window(start=time.perf_counter())
    torch.cuda._sleep(1_000_000_000)  # a step of 1e9 GPU clock cycles: 0.5 s or more at 2 GHz or less
    window.add_step(zero, zero, zero, images=100)
    scalars = _close_window(window, 1e-3, TrainState(), 1e-12, ctx)
    assert scalars["perf/images_per_sec"] < 100 / 0.45


@pytest.mark.slow
def test_the_data_wait_is_the_share_of_the_window_spent_waiting_for_batches(demo_shards, tmp_path):
    """2 ranks of a stream each, reading one shard whose `pipe:` command sleeps 1 s first, in the
    training process (data.num_workers=0): each waits at least about that 1 s in step 1, whose line
    is a window of its own; data_wait_frac is the ranks' mean share, not their sum. The windows'
    images are both ranks': over the events' times, steps 2-12 give perf/images_per_sec (one
    rank's would be half, a double count twice)."""
    slow = [f"pipe:sleep 1 && cat {url}" for url in expand_urls(demo_shards["train"])[:2]]
    run = run_pretrain(2, [f"data.train_shards={json.dumps(slow)}", "data.val_shards=null", "data.streams=2",
                           "data.num_workers=0", "train.global_batch_size=16", "data.micro_batch_size=8",
                           "train.steps=12", "log.every_steps=12", "ckpt.every_steps=0", f"run.dir={tmp_path}"],
                       timeout_s=120)
    assert run.returncode == 0, run.stderr[-3000:]
    scalars = read_scalars(tmp_path / "tb")
    assert [step for step, _ in scalars["perf/data_wait_frac"]] == [1, 12]
    (_, wait_frac), (_, per_sec) = scalars["perf/data_wait_frac"][0], scalars["perf/images_per_sec"][0]
    window_s = 16 / per_sec
    assert 0.75 <= wait_frac * window_s <= window_s, (wait_frac, window_s)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    wall = {e.step: e.wall_time for e in events.Scalars("perf/images_per_sec")}
    assert 0.7 < scalars["perf/images_per_sec"][1][1] * (wall[12] - wall[1]) / (11 * 16) < 1.7, (scalars, wall)


@pytest.mark.slow
def test_a_tensorboard_file_that_cannot_be_written_stops_the_logging_not_the_run(demo_shards, tmp_path):
    """A full disk under tb/ (a file-size limit: the write fails with EFBIG where it would with
    ENOSPC) once stopped rank 0 with TensorBoard's traceback, before the checkpoint save, which needs
    the space more, could say so. Now the console keeps the lines to the end, where the checkpoint
    fails in its own words."""
    def small_files():
        # config.yaml and multiprocessing's first shared-memory arena (4 KiB) fit; the event file not for long.
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))

    run = run_pretrain(0, [*shard_overrides(demo_shards), "data.val_shards=null", f"run.dir={tmp_path}",
                           "data.num_workers=0", "train.steps=30", "log.every_steps=1", "ckpt.every_steps=0",
                           "train.global_batch_size=32", "data.micro_batch_size=16"], preexec_fn=small_files)
    assert "TensorBoard logging stops, its event file in" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr.split("error: checkpoint at step 30")[0]  # nor TensorBoard's writer thread's
    logged = max(step for step, _ in read_scalars(tmp_path / "tb")["train/loss"])
    assert 1 <= logged < 30
    assert "step 30/30 | loss" in run.stdout  # trained on, to the end
    assert run.returncode == 1 and "error: checkpoint at step 30 could not be written" in run.stderr


def test_the_console_line_gives_the_time_left_at_the_pace_since_the_first_line(tmp_path, capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    logger = MetricLogger(tmp_path / "tb", total_steps=1000, enabled=True)
    logger.log(10, {"train/loss": 2.0})
    now[0] = 0.5
    logger.log(20, {"train/loss": 1.9})  # 0.05 s a step: 980 steps left, 49 s
    logger.log(1000, {"train/loss": 1.0})
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 10/1000 | loss 2.0000"  # no pace yet
    assert lines[1] == "step 20/1000 | loss 1.9000 | eta 49s"
    assert lines[2] == "step 1000/1000 | loss 1.0000"


def test_the_time_left_after_a_resume_counts_from_its_first_training_line_not_its_owed_validation(tmp_path, capsys):
    """A run resumed at a step that owes a validation logs it before the loader and the first step
    start: counted from there, the start-up made the pace of the first lines several times slower."""
    logger = MetricLogger(tmp_path / "tb", total_steps=1000, enabled=True, purge_step=101)
    logger.log(100, {"val/loss": 1.0})
    time.sleep(2)  # start-up
    logger.log(110, {"train/loss": 2.0})
    time.sleep(0.2)
    logger.log(120, {"train/loss": 1.9})  # 0.02 s a step: 880 steps left, 18 s
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["step 100/1000 | val_loss 1.0000", "step 110/1000 | loss 2.0000"]
    eta = int(re.fullmatch(r"step 120/1000 \| loss 1\.9000 \| eta (\d+)s", lines[2]).group(1))
    assert 17 <= eta <= 60  # a loaded machine only lengthens the sleep


def test_the_steps_named_are_profiled_in_a_trace_per_rank(demo_shards, tmp_path):
    """log.profile_steps=[2, 3] on 2 ranks: each writes one trace of steps 2 and 3 only, with the
    model's own ops in it; a range that is not [first, last] is refused."""
    run = run_pretrain(2, [*shard_overrides(demo_shards), "data.val_shards=null", "train.steps=4", "ckpt.every_steps=0",
                           "log.profile_steps=[2,3]", f"run.dir={tmp_path}"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["rank0-steps2-3.json", "rank1-steps2-3.json"]
    names = {event.get("name") for event in json.loads((tmp_path / "profile" / "rank0-steps2-3.json").read_text())["traceEvents"]}
    assert {"step 2", "step 3"} <= names and not {"step 1", "step 4"} & names
    assert {"aten::addmm", "aten::scaled_dot_product_attention"} & names  # the ViT's own work
    assert "steps 2-3 profiled" in run.stderr

    refused = run_pretrain(0, [*shard_overrides(demo_shards), "log.profile_steps=[3,2]", f"run.dir={tmp_path / 'no'}"])
    assert refused.returncode == 2 and "config key 'log.profile_steps' is [first, last]" in refused.stderr


def test_a_run_that_ends_fails_or_is_preempted_inside_the_profiled_steps_writes_their_trace(demo_shards, tmp_path):
    """log.profile_steps=[3, 1000]: a run that ends at train.steps=4 writes the trace of steps 3-4; one
    that diverges (train.max_bad_steps) exits 2 and one preempted exits 75, each with the trace of the
    steps it ran (a profiler left running made the process crash at its exit: SIGSEGV)."""
    common = [*shard_overrides(demo_shards), "data.val_shards=null", "ckpt.every_steps=0", "log.every_steps=1",
              "log.profile_steps=[3,1000]"]
    ended = run_pretrain(0, [*common, "train.steps=4", f"run.dir={tmp_path / 'ended'}"])
    assert ended.returncode == 0, ended.stderr[-3000:]
    assert [p.name for p in (tmp_path / "ended" / "profile").iterdir()] == ["rank0-steps3-4.json"]
    failed = run_pretrain(0, [*common, "train.steps=30", "optim.lr=1e30", "optim.min_lr=1e30", "optim.warmup_steps=1",
                              "train.max_bad_steps=2", f"run.dir={tmp_path / 'failed'}"])
    assert failed.returncode == 2, failed.stderr[-3000:]
    last = int(re.search(r"2 steps in a row up to step (\d+) had a NaN/Inf loss", failed.stderr).group(1))
    assert [p.name for p in (tmp_path / "failed" / "profile").iterdir()] == [f"rank0-steps3-{last}.json"]

    run_dir = tmp_path / "preempted"
    with background_pretrain(0, [*common, "train.steps=1000", f"run.dir={run_dir}"], tmp_path / "run.log") as process:
        wait_for(lambda: (run_dir / "tb").is_dir() and len(read_scalars(run_dir / "tb").get("train/loss", [])) >= 4,
                 process)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=120) == 75, (tmp_path / "run.log").read_text()[-3000:]
    step = int(re.search(r"preempted at step (\d+)", (tmp_path / "run.log").read_text()).group(1))
    assert [p.name for p in (run_dir / "profile").iterdir()] == [f"rank0-steps3-{step}.json"]
    names = {event.get("name") for event in json.loads((run_dir / "profile" / f"rank0-steps3-{step}.json").read_text())["traceEvents"]}
    assert {f"step {s}" for s in range(3, step + 1)} <= names
