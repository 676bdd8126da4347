"""Exact resume on any world size and strategy, after SIGKILL, SIGTERM or a killed save."""

import json
import os
import re
import signal
import time

import pytest
import timm
from safetensors.torch import load_file

from conftest import (EXACT, gone, loss_curve, read_scalars, run_pretrain, shard_overrides, start_pretrain,
                      wait_for, worker_pid)
from vitdist.export import export

pytestmark = pytest.mark.slow


def positions(run_dir, step):
    return json.loads((run_dir / "checkpoints" / f"step_{step}" / "train_state.json").read_text())["data_positions"]


def logged_steps(log_path):
    return [int(s) for s in re.findall(r"^step (\d+)/", log_path.read_text(), re.M)]


def test_sigkill_then_resume_is_bitwise_identical(demo_shards, tmp_path):
    """With drop path and mixup/cutmix: their draws, reseeded per (seed, rank, step), resume too."""
    common = [*shard_overrides(demo_shards), *EXACT, "train.steps=28", "data.micro_batch_size=32",
              "model.drop_path_rate=0.1", "train.mixup_alpha=0.8", "train.cutmix_alpha=1.0"]
    reference = run_pretrain(2, [*common, f"run.dir={tmp_path / 'ref'}", "ckpt.async_save=true"])
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir, log_path = tmp_path / "killed", tmp_path / "killed.log"
    process = start_pretrain(2, [*common, f"run.dir={run_dir}"], log_path)
    # Killed 2 or 3 steps past a checkpoint (every 4 steps), so the resumed run logs those steps again.
    wait_for(lambda: (steps := logged_steps(log_path)) and steps[-1] >= 10 and steps[-1] % 4 in (2, 3), process)
    ranks = [worker_pid(process.pid, rank) for rank in (0, 1)]
    os.killpg(process.pid, signal.SIGKILL)  # torchrun, no warning; its ranks must die with it
    process.wait()
    deadline = time.time() + 30
    while not all(gone(pid) for pid in ranks):
        assert time.time() < deadline, "a rank outlived its torchrun"
        time.sleep(0.05)
    done = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*[0-9]"))
    assert 8 <= done[-1] < 28
    assert loss_curve(run_dir)[-1][0] >= done[-1] + 2  # logged past the checkpoint: steps to purge on resume
    (run_dir / "checkpoints" / f"step_{done[-1] + 2}.tmp").mkdir()  # as if killed while saving

    resumed = run_pretrain(2, [*common, f"run.dir={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{done[-1]}'} at step {done[-1]}" in resumed.stderr
    got = loss_curve(run_dir)
    assert [s for s, _ in got] == list(range(1, 29))  # no step twice, none missing, in TensorBoard's view
    assert got == loss_curve(tmp_path / "ref")  # bitwise
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_24", "step_28"]
    assert positions(run_dir, 28) == positions(tmp_path / "ref", 28)


def test_resume_across_world_sizes_and_strategies(demo_shards, tmp_path):
    """FSDP x2 -> DDP x1 -> FSDP x2 with activation checkpointing -> DDP x4, against one
    uninterrupted DDP x2 run: the same losses within float tolerance and the same stream
    positions (8 steps = one epoch). A lower lr than EXACT's: DDP and FSDP sum gradients in different
    orders, and at 2e-3 training on the demo shapes amplifies that 1e-7 noise past 1e-4 by step 22."""
    common = [*shard_overrides(demo_shards), *EXACT, "ckpt.keep=0", "data.num_workers=1", "data.micro_batch_size=16",
              "optim.lr=5e-4", "optim.min_lr=5e-4"]
    reference = run_pretrain(2, [*common, "train.steps=32", f"run.dir={tmp_path / 'ref'}"])
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "chain"
    chain = ((2, "fsdp", 8, False), (0, "ddp", 16, False), (2, "fsdp", 24, True), (4, "ddp", 32, False))
    for nproc, strategy, steps, grad_ckpt in chain:
        run = run_pretrain(nproc, [*common, f"dist.strategy={strategy}", f"train.steps={steps}", f"run.dir={run_dir}",
                                   f"model.grad_checkpointing={str(grad_ckpt).lower()}"])
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"steps {steps - 8} -> {steps}" in run.stdout
        if strategy == "fsdp":  # each rank holds about half of the parameters
            total, local = map(float, re.search(r"([\d.]+)M params \(([\d.]+)M on rank 0\)", run.stdout).groups())
            assert local == pytest.approx(total / 2, rel=0.05)
        assert positions(run_dir, steps) == positions(tmp_path / "ref", steps)
    assert all(p == [3, 0, 32] for p in positions(run_dir, 32).values())  # 4 epochs, each sample once per epoch
    expected, got = loss_curve(tmp_path / "ref"), loss_curve(run_dir)
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 33))
    # A checkpoint written by FSDP exports to one file that timm loads strictly.
    out = export(run_dir / "checkpoints" / "step_24", tmp_path / "fsdp.safetensors")
    meta = json.loads(out.with_suffix(".json").read_text())
    timm.create_model(meta["arch"], **meta["timm_kwargs"]).load_state_dict(load_file(out), strict=True)
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-4)


def test_sigterm_checkpoints_within_a_step_and_exits_75(demo_shards, tmp_path):
    common = [*shard_overrides(demo_shards), *EXACT, "ckpt.every_steps=0", "data.micro_batch_size=32",
              f"run.dir={tmp_path}"]
    process = start_pretrain(0, [*common, "train.steps=1000"], tmp_path / "run.log")
    wait_for(lambda: (tmp_path / "tb").is_dir() and len(read_scalars(tmp_path / "tb").get("train/loss", [])) >= 3,
             process)
    os.killpg(process.pid, signal.SIGTERM)  # the process and its loader workers, as SLURM signals a job
    assert process.wait(timeout=120) == 75
    log = (tmp_path / "run.log").read_text()
    step, newest = map(int, re.search(r"preempted at step (\d+): exiting with 75; the newest complete checkpoint is "
                                      r".*step_(\d+)", log).groups())
    assert newest == step  # written at the step the signal stopped
    assert 3 <= step < 1000 and (tmp_path / "checkpoints" / f"step_{step}" / ".metadata").is_file()

    resumed = run_pretrain(0, [*common, f"train.steps={step + 2}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stderr and f"steps {step} -> {step + 2}" in resumed.stdout
