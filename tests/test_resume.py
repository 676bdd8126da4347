"""Exact resume on any world size and strategy, after SIGKILL, SIGTERM or a killed save."""

import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from braceexpand import braceexpand
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import (EXACT, TINY, background_pretrain, loss_curve, outliving, png_bytes, read_scalars, read_texts,
                      pretrain_command, run_captured, run_pretrain, running, shard_overrides, wait_for, worker_pid,
                      write_png_folder, write_shard)
from vitdist.config import ConfigError
from vitdist.streams import shard_order
from vitdist.config_yaml import load_config
from vitdist.demo_data import write_demo_dataset
from vitdist.shard_list import expand_urls
from vitdist.checkpoint_read import load_model_weights
from vitdist.export import export, recorded_best
from vitdist.resume import added_keys, changes, shard_ids
from vitdist.preflight import preflight

pytestmark = pytest.mark.slow


def positions(run_dir, step):
    return json.loads((run_dir / "checkpoints" / f"step_{step}" / "train_state.json").read_text())["data_positions"]


def logged_steps(log_path):
    return [int(s) for s in re.findall(r"^step (\d+)/", log_path.read_text(), re.M)]


def test_sigkill_then_resume_is_bitwise_identical(demo_shards, tmp_path):
    """With drop path, mixup/cutmix and random erasing: their draws, reseeded per (seed, rank, step),
    resume too; and RandAugment's, seeded per sample; and the average of the weights."""
    common = [*shard_overrides(demo_shards), *EXACT, "train.steps=28", "data.micro_batch_size=32",
              "model.drop_path_rate=0.1", "train.mixup_alpha=0.8", "train.cutmix_alpha=1.0",
              "data.rand_augment=rand-m9-mstd0.5-inc1", "data.random_erase=0.25", "train.ema_decay=0.9",
              "train.ema_warmup=true"]
    reference = run_pretrain(2, [*common, f"run.dir={tmp_path / 'ref'}", "ckpt.async_save=true"])
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir, log_path = tmp_path / "killed", tmp_path / "killed.log"
    with background_pretrain(2, [*common, f"run.dir={run_dir}"], log_path) as process:
        # Killed 2 or 3 steps past a checkpoint (every 4 steps), so the resumed run logs those steps again.
        wait_for(lambda: (steps := logged_steps(log_path)) and steps[-1] >= 10 and steps[-1] % 4 in (2, 3), process)
        ranks = [worker_pid(process.pid, rank) for rank in (0, 1)]
        os.killpg(process.pid, signal.SIGKILL)  # torchrun, no warning; its ranks must die with it
        process.wait()
        assert outliving(ranks, wait_s=30) == [], "a rank outlived its torchrun"
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
    averages = [load_model_weights(run / "checkpoints" / "step_28", average=True)[0] for run in (run_dir, tmp_path / "ref")]
    assert all(torch.equal(averages[0][name], averages[1][name]) for name in averages[1])


def test_resume_across_world_sizes_and_strategies(demo_shards, tmp_path):
    """FSDP x2 -> DDP x1 -> FSDP x2 with activation checkpointing -> DDP x4, against one
    uninterrupted DDP x2 run: the same losses within float tolerance and the same stream
    positions. 8 steps are one epoch: each world size takes over in the middle of one. A lower lr
    than EXACT's: DDP and FSDP sum gradients in different orders, and at 2e-3 training on the demo
    shapes amplifies that 1e-7 noise past 1e-4 by step 22."""
    common = [*shard_overrides(demo_shards), *EXACT, "ckpt.every_steps=6", "ckpt.keep=0", "data.num_workers=1",
              "data.micro_batch_size=16", "optim.lr=5e-4", "optim.min_lr=5e-4", "train.ema_decay=0.8"]
    reference = run_pretrain(2, [*common, "train.steps=24", f"run.dir={tmp_path / 'ref'}"])
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "chain"
    chain = ((2, "fsdp", 6, False), (0, "ddp", 12, False), (2, "fsdp", 18, True), (4, "ddp", 24, False))
    for nproc, strategy, steps, grad_ckpt in chain:
        run = run_pretrain(nproc, [*common, f"dist.strategy={strategy}", f"train.steps={steps}", f"run.dir={run_dir}",
                                   f"model.grad_checkpointing={str(grad_ckpt).lower()}"])
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"steps {steps - 6} -> {steps}" in run.stdout
        if strategy == "fsdp":  # each rank holds about half of the parameters
            total, local = map(float, re.search(r"([\d.]+)M params \(([\d.]+)M on rank 0\)", run.stdout).groups())
            assert local == pytest.approx(total / 2, rel=0.05)
        assert positions(run_dir, steps) == positions(tmp_path / "ref", steps)
    assert all(p[:3] == [2, 0, 32] for p in positions(run_dir, 24).values())  # 3 epochs, each sample once per epoch
    expected, got = loss_curve(tmp_path / "ref"), loss_curve(run_dir)
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 25))
    # A checkpoint written by FSDP exports to one file that timm loads strictly.
    out = export(run_dir / "checkpoints" / "step_18", tmp_path / "fsdp.safetensors")
    meta = json.loads(out.with_suffix(".json").read_text())
    timm.create_model(meta["arch"], **meta["timm_kwargs"]).load_state_dict(load_file(out), strict=True)
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-4)
    # The average of the weights, kept sharded under FSDP and whole under DDP, carries on too: as
    # close as the weights are (3e-5 apart), where the average is 2e-3 from the weights.
    averages = [load_model_weights(run / "checkpoints" / "step_24", average=True)[0] for run in (run_dir, tmp_path / "ref")]
    for name, value in averages[1].items():
        torch.testing.assert_close(averages[0][name], value, rtol=0, atol=1e-4)
    # Clipping is on (optim.clip_grad_norm=1, norms of 1 to 3): under FSDP the norm clipped to, and
    # logged, is the global one over all ranks' shards, DDP's.
    norms = {run: [v for _, v in read_scalars(run / "tb")["train/grad_norm"]] for run in (tmp_path / "ref", run_dir)}
    assert max(norms[run_dir]) > 1 and norms[run_dir] == pytest.approx(norms[tmp_path / "ref"], rel=1e-3)


def test_sigterm_checkpoints_within_a_step_and_exits_75(demo_shards, tmp_path):
    """Validated at every step, so the signal stops the run at a step that owes a validation:
    the resumed run validates there first, so no step is missing from val/ or from the race for
    the best weights; and only once, though that run is killed and the next resumes there too."""
    common = [*shard_overrides(demo_shards), *EXACT, f"data.val_shards={demo_shards['val']}",
              "train.eval_every_steps=1", "ckpt.every_steps=0", "data.micro_batch_size=32", f"run.dir={tmp_path}"]
    with background_pretrain(0, [*common, "train.steps=1000"], tmp_path / "run.log") as process:
        wait_for(lambda: (tmp_path / "tb").is_dir() and len(read_scalars(tmp_path / "tb").get("train/loss", [])) >= 3,
                 process)
        os.killpg(process.pid, signal.SIGTERM)  # the process and its loader workers, as SLURM signals a job
        assert process.wait(timeout=120) == 75
    log = (tmp_path / "run.log").read_text()
    step, newest = map(int, re.search(r"preempted at step (\d+): exiting with 75; the newest complete checkpoint is "
                                      r".*step_(\d+)", log).groups())
    assert newest == step  # written at the step the signal stopped
    assert 3 <= step < 1000 and (tmp_path / "checkpoints" / f"step_{step}" / ".metadata").is_file()
    assert [s for s, _ in read_scalars(tmp_path / "tb")["val/top1"]] == list(range(1, step))

    # A resumed run killed (SIGKILL: no checkpoint) after its owed validation and a step.
    with background_pretrain(0, [*common, "train.steps=1000"], tmp_path / "killed.log") as process:
        wait_for(lambda: [s for s, _ in read_scalars(tmp_path / "tb")["val/top1"]][-1:] == [step + 1], process)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    validated = f"step {step}: validating first, as the preempted run that checkpointed there did not"
    assert validated in (tmp_path / "killed.log").read_text()

    resumed = run_pretrain(0, [*common, f"train.steps={step + 2}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stderr and f"steps {step} -> {step + 2}" in resumed.stdout
    top1 = read_scalars(tmp_path / "tb")["val/top1"]
    assert [s for s, _ in top1] == list(range(1, step + 3))  # step `step` once: the killed run's, not again
    assert validated not in resumed.stderr
    assert f"step {step}: validated and logged by a run resumed from here before: not again" in resumed.stderr
    assert recorded_best(tmp_path / "best.safetensors")["val_top1"] == pytest.approx(max(v for _, v in top1))


# A shard through a slow network: the second time it is read (the first is the config check's),
# it stops after its first two samples until the file `go` appears.
PAUSING_SHARD = """
import os, sys, tarfile, time
shard, paused, go = sys.argv[1:]
data = open(shard, "rb").read()
with open(shard + ".reads", "a") as reads:
    reads.write("read\\n")
with open(shard + ".reads") as reads:
    pause = tarfile.open(shard).getmembers()[4].offset if len(reads.readlines()) == 2 else len(data)
sys.stdout.buffer.write(data[:pause])
sys.stdout.buffer.flush()
if pause < len(data):
    open(paused, "w").close()
    while not os.path.exists(go):
        time.sleep(0.05)
sys.stdout.buffer.write(data[pause:])
"""


def _one_rank_signalled(rank, out_dir):
    import torch.distributed as dist

    from vitdist.distributed import DistContext
    from vitdist.preemption import Preemption

    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=2)
    try:
        preemption = Preemption()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        ctx = DistContext(rank, 2, torch.device("cpu"), control=dist.group.WORLD)
        (out_dir / f"rank{rank}.json").write_text(json.dumps([preemption.requested(ctx) for _ in range(3)]))
        preemption.settle()
    finally:
        dist.destroy_process_group()


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """A node's own SIGTERM, or a `kill` of one rank: the ranks agree at the next step's read."""
    import torch.multiprocessing as mp

    mp.spawn(_one_rank_signalled, args=(tmp_path,), nprocs=2)
    assert [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)] == [[False, True, True]] * 2


def test_a_preemption_signal_to_the_jobs_processes_leaves_pipe_commands_reading(tmp_path):
    """SIGTERM to the training process's group (a shell's or SLURM's signal to the job) reached the
    `pipe:` commands it reads its shards through without loader workers (with workers, their
    commands are in the workers' groups, and a signal to every process of the job reaches them
    alike). Ended mid-shard, the rest of the shard was skipped as a read error in the steps before
    the preemption's checkpoint, which then recorded positions past it: samples never seen that
    epoch. The commands ignore it, and the checkpoint is the uninterrupted run's."""
    shards = [tmp_path / f"s{s}.tar" for s in range(2)]
    for s, shard in enumerate(shards):
        write_shard(shard, [{"__key__": f"s{s}_{i:02d}", "png": png_bytes((s * 100, i * 10, 0)), "cls": i % 8}
                            for i in range(16)])
    (tmp_path / "pause.py").write_text(PAUSING_SHARD)
    piped = [f"pipe:{sys.executable} {tmp_path / 'pause.py'} {shard} {tmp_path / 'paused'} {tmp_path / 'go'}"
             for shard in shards]
    common = [*EXACT, "data.val_shards=null", "data.streams=1", "data.num_workers=0", "data.shuffle_block=2",
              "train.global_batch_size=4", "data.micro_batch_size=4", "ckpt.every_steps=1", "ckpt.keep=0"]
    reference = run_pretrain(0, [*common, f"data.train_shards={json.dumps(list(map(str, shards)))}",
                                 "train.steps=12", f"run.dir={tmp_path / 'ref'}"])
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir, log_path = tmp_path / "run", tmp_path / "run.log"
    with background_pretrain(0, [*common, f"data.train_shards={json.dumps(piped)}", "train.steps=100",
                                 "ckpt.every_steps=0", f"run.dir={run_dir}"], log_path) as process:
        wait_for(lambda: (tmp_path / "paused").exists(), process)  # a step's samples are on their way
        os.killpg(process.pid, signal.SIGTERM)
        time.sleep(1)
        (tmp_path / "go").touch()
        assert process.wait(timeout=120) == 75, log_path.read_text()[-3000:]
    step = int(re.search(r"preempted at step (\d+)", log_path.read_text())[1])
    assert step < 12 and "read_error" not in log_path.read_text()
    state = json.loads((run_dir / "checkpoints" / f"step_{step}" / "train_state.json").read_text())
    assert state["skipped"] == {} and state["data_positions"] == positions(tmp_path / "ref", step)
    assert loss_curve(run_dir) == loss_curve(tmp_path / "ref")[:step]


STALLING_SHARD = """
import os, signal, sys
shard = sys.argv[1]
with open(shard + ".reads", "a") as reads:
    reads.write("read\\n")
with open(shard + ".reads") as reads:
    if len(reads.readlines()) >= 2:  # its read for training (the first is the config check's)
        # The preemption's SIGTERM to the training process's group, this command's too, as the
        # read starts; then half the shard (4 steps' samples), for the steps until the preemption's
        # checkpoint, even where the loader reads no further ahead than the steps (a loaded machine).
        os.killpg(0, signal.SIGTERM)
        data = open(shard, "rb").read()
        sys.stdout.buffer.write(data[: len(data) // 2])
        sys.stdout.buffer.flush()
        signal.pause()  # a network read that hangs; SIGTERM ignored, as vitdist.tars has it
sys.stdout.buffer.write(open(shard, "rb").read())
"""


def test_a_preemption_exits_while_a_read_ahead_stalls(tmp_path):
    """The loader reads ahead into a shard whose `pipe:` command hangs while the steps still train
    on what was read before. The preemption's checkpoint needs nothing of what hangs, but the run
    waited at its exit for the stalled read until the loader's timeout (600 s), past a scheduler's
    grace: now its reads are ended after a grace, and it exits 75, its command ended."""
    for s in range(2):
        write_shard(tmp_path / f"s{s}.tar", [{"__key__": f"s{s}_{i:03d}", "png": png_bytes((s * 100, i, 0)),
                                               "cls": i % 8} for i in range(256)])
    (tmp_path / "stall.py").write_text(STALLING_SHARD)
    good = f"pipe:cat {tmp_path / 's0.tar'}"
    stalling = f"pipe:{sys.executable} {tmp_path / 'stall.py'} {tmp_path / 's1.tar'}"
    urls = [good, stalling] if shard_order([good, stalling], 0, 0)[0] == good else [stalling, good]
    overrides = [*EXACT, "data.val_shards=null", "data.streams=1", "data.num_workers=0", "data.shuffle_block=8",
                 "train.global_batch_size=32", "data.micro_batch_size=32", "ckpt.every_steps=0", "train.steps=100",
                 f"data.train_shards={json.dumps(urls)}", f"run.dir={tmp_path / 'run'}"]
    # A session of its own: the command signals its process group, which must not be the tests'.
    run = run_captured(pretrain_command(0, overrides), 120, start_new_session=True)
    assert run.returncode == 75, run.stderr[-3000:]
    step = int(re.search(r"preempted at step (\d+)", run.stderr)[1])
    # Before the stall: the first shard's 8 steps, and the 4 of the second's first half.
    assert step <= 12 and (tmp_path / "run" / "checkpoints" / f"step_{step}").is_dir()
    assert running(str(tmp_path / "stall.py")) == []


def test_a_second_run_in_a_run_dir_in_use_is_refused_and_the_first_trains_on(demo_shards, tmp_path):
    """A run started in the run.dir of one still training (outside SLURM, which refuses it by its
    job): refused on every rank before anything is written there, naming the process that holds
    it; the first trains on, its FATAL and FINISHED untouched. The lock goes with a SIGKILLed run."""
    run_dir = tmp_path / "run"
    common = [*shard_overrides(demo_shards), "data.val_shards=null", "ckpt.every_steps=2", f"run.dir={run_dir}"]
    with background_pretrain(0, [*common, "train.steps=1000"], tmp_path / "first.log") as first:
        wait_for(lambda: (run_dir / "checkpoints" / "step_2").is_dir(), first)
        (run_dir / "FINISHED").write_text("a mark the second run's start would delete\n")
        config = (run_dir / "config.yaml").read_text()
        second = run_pretrain(2, [*common, "train.steps=1000"])
        assert second.returncode == 1 and "exitcode: 2" in second.stderr, second.stderr[-3000:]  # torchrun's 1
        refusal = f"config error: run.dir '{run_dir}' is in use by another run (pid {first.pid} on "
        assert second.stderr.count(refusal) == 2, second.stderr[-3000:]  # each rank says it
        assert first.poll() is None and (run_dir / "FINISHED").exists() and not (run_dir / "FATAL").exists()
        assert (run_dir / "config.yaml").read_text() == config
        first.kill()
        first.wait()
    from vitdist.checkpoint import newest_checkpoint

    last = int(newest_checkpoint(run_dir / "checkpoints").name.removeprefix("step_"))
    again = run_pretrain(0, [*common, f"train.steps={last}"])  # the lock is free: nothing left to train
    assert again.returncode == 0 and "nothing to train" in again.stderr, again.stderr[-3000:]
    assert all(step <= last for step, _ in read_texts(run_dir / "tb").get("config", []))  # none at a step never trained


def test_a_run_dir_locked_from_another_host_says_how_to_get_past_a_crashed_one(tmp_path):
    """On NFS a crashed host's lock outlives it (NFSv3's until the host is back): a refusal naming
    another host says so, and which file to delete; one naming this host does not. The holder's
    line replaces a longer one a run before left, whole."""
    import socket
    import subprocess

    from conftest import ENV
    from vitdist import run_lock

    (tmp_path / run_lock.LOCK).write_text(f"pid 4242 on {'a-long-gone-host.' * 10}, since 2026-01-01 00:00:00\n")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from vitdist import "
                               "run_lock; run_lock.hold(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline() == "held\n"
        assert re.fullmatch(rf"pid {holder.pid} on \S+, since [\d-]+ [\d:]+\n", (tmp_path / run_lock.LOCK).read_text())
        for host, hint in (("node7", True), (socket.gethostname(), False)):
            (tmp_path / run_lock.LOCK).write_text(f"pid 4242 on {host}, since 2026-12-05 14:24:56\n")
            with pytest.raises(ConfigError) as refused:
                run_lock.hold(tmp_path)
            assert f"is in use by another run (pid 4242 on {host}, since 2026-12-05 14:24:56)" in str(refused.value)
            assert (f"(if node7 is down: NFS keeps a crashed host's lock until its lease ends, NFSv4's in about 90 s, "
                    f"NFSv3's once that host is back; once sure that no run is active there, delete "
                    f"'{tmp_path / run_lock.LOCK}')" in str(refused.value)) == hint, str(refused.value)
    finally:
        holder.kill()
        holder.wait()


def test_a_slurm_job_holds_the_lock_but_passes_over_one_its_own_earlier_attempt_left(demo_shards, tmp_path, monkeypatch):
    """A job of the SLURM scripts takes the lock, so that a run started by hand in its run.dir is
    refused (they took none: the two trained side by side); a requeue of the same job, whose crashed
    node's lock NFS keeps, runs on with a warning; another job is refused, and so is the same job's
    lock held on this host, which no crash left (a host's own locks end with their processes)."""
    import subprocess

    from conftest import ENV, REPO
    from vitdist import run_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from vitdist import "
                               "run_lock; run_lock.hold(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, env={**ENV, "VITDIST_SLURM_JOB": "77_3"})
    try:
        assert holder.stdout.readline() == "held\n"
        assert (tmp_path / run_lock.LOCK).read_text().endswith(", SLURM job 77_3\n")
        monkeypatch.delenv("VITDIST_SLURM_JOB", raising=False)
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid \d+ on .*, SLURM job 77_3\)"):
            run_lock.hold(tmp_path)  # by hand
        monkeypatch.setenv("VITDIST_SLURM_JOB", "77_4")
        with pytest.raises(ConfigError, match="is in use by another run"):
            run_lock.hold(tmp_path)
        monkeypatch.setenv("VITDIST_SLURM_JOB", "77_3")
        with pytest.raises(ConfigError, match="is in use by another run"):
            run_lock.hold(tmp_path)  # alive, on this host
        (tmp_path / run_lock.LOCK).write_text("pid 4242 on node7, since 2026-12-05 14:24:56, SLURM job 77_3\n")
        assert run_lock.hold(tmp_path) == (
            f"run.dir '{tmp_path}' is locked by an earlier attempt of this job (pid 4242 on node7, since 2026-12-05 "
            "14:24:56, SLURM job 77_3), which its file system takes for alive (a crashed node's lock on NFS): this "
            "attempt runs without the lock")
        # The job's config check refuses a run.dir a run holds (exit 2: not requeued), before its batch
        # script writes there; a check by hand does not look.
        (tmp_path / run_lock.LOCK).write_text("pid 4242 on node7, since 2026-12-05 14:24:56\n")
        check = [sys.executable, "launch/pretrain.py", "--config", str(TINY), "--check", *shard_overrides(demo_shards),
                 f"run.dir={tmp_path}"]
        by_job = subprocess.run(check, cwd=REPO, capture_output=True, text=True, timeout=120,
                                env={**ENV, "VITDIST_SLURM_JOB": "78"})
        assert by_job.returncode == 2 and "is in use by another run (pid 4242 on node7" in by_job.stderr, by_job.stderr
        by_hand = subprocess.run(check, cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
        assert by_hand.returncode == 0, by_hand.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_resume_that_would_read_other_samples_or_load_another_model_is_refused(demo_shards, tmp_path):
    """Checked against the checkpoint before any process group starts, each refusal naming the key
    and both values. What the user may change (the schedule, as to train longer, or the drop path
    rate) resumes, logged key by key; world size, workers, micro-batch size and activation
    checkpointing resume silently (test_resume_across_world_sizes_and_strategies)."""
    run_dir = tmp_path / "run"
    common = [*shard_overrides(demo_shards), *EXACT, "data.val_shards=null", "optim.min_lr=1e-5",
              f"run.dir={run_dir}"]
    first = run_pretrain(0, [*common, "train.steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    step_4 = run_dir / "checkpoints" / "step_4"
    urls = list(braceexpand(demo_shards["train"]))
    (tmp_path / "moved").mkdir()
    for url in urls:
        shutil.copy(url, tmp_path / "moved")
    moved = [str(tmp_path / "moved" / Path(url).name) for url in urls]
    shutil.copy(urls[0], tmp_path / "moved" / "renamed.tar")
    lists = {"reordered": urls[1:] + urls[:1], "added": [*urls, str(tmp_path / "moved" / "renamed.tar")], "moved": moved,
             "renamed": [str(tmp_path / "moved" / "renamed.tar"), *moved[1:]]}
    for name, shards in lists.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(shards))

    def check(*overrides, run=run_dir):
        preflight(load_config(TINY, [*common, f"run.dir={run}", *overrides]), world_size=1)

    ahead = "its data stream positions would index another sample order"
    refusals = {
        "model.depth=3": "model.depth=3, but checkpoint '{c}' holds a model with model.depth=4: its weights do not fit",
        "model.mlp_ratio=2": "model.mlp_ratio=2.0, but checkpoint '{c}' holds a model with model.mlp_ratio=null (4.0, the "
                             "arch's own): its weights do not fit",
        "model.arch=vit_small_patch16_224": "model.arch=vit_small_patch16_224, but checkpoint '{c}' holds a model with "
                                            "model.arch=vit_tiny_patch16_224",
        "data.seed=1": "data.seed=1, but checkpoint '{c}' was trained with data.seed=0: " + ahead,
        "data.shuffle_block=64": "data.shuffle_block=64, but checkpoint '{c}' was trained with data.shuffle_block=128",
        "data.streams=8": "data.streams=8, but checkpoint '{c}' holds the positions of 16 data streams",
        "data.train_shards={t}/added.txt": "data.train_shards names 17 shards, checkpoint '{c}' was trained on 16: " + ahead,
        "data.train_shards={t}/reordered.txt": "data.train_shards names the 16 shards checkpoint '{c}' was trained "
                                               "on, in another order: " + ahead,
        "data.train_shards={t}/renamed.txt": "data.train_shards names other shards than the 16 checkpoint '{c}' was "
                                             "trained on: " + ahead,
        "train.steps=3": "train.steps=3, but checkpoint '{c}' is at step 4 already: give train.steps >= 4",
    }
    for override, message in refusals.items():
        with pytest.raises(ConfigError, match=re.escape(message.format(c=step_4))):
            check(override.format(t=tmp_path))
    check(f"data.train_shards={tmp_path}/moved.txt", "data.num_workers=0", "data.micro_batch_size=16")
    check("model.mlp_ratio=4.0")  # the arch's own, as the checkpoint's null is: it had been refused as another model
    # Parallel blocks hold no attn or mlp to read the heads and MLP width from: compared as written.
    recorded = (step_4 / "model.json").read_text()
    (step_4 / "model.json").write_text(recorded.replace("vit_tiny_patch16_224", "vit_small_patch16_18x2_224"))
    with pytest.raises(ConfigError, match=re.escape(f"model.mlp_ratio=2.0, but checkpoint '{step_4}' holds a model with "
                                                    "model.mlp_ratio=null: its weights do not fit")):
        check("model.arch=vit_small_patch16_18x2_224", "model.mlp_ratio=2")
    check("model.arch=vit_small_patch16_18x2_224")
    (step_4 / "model.json").write_text(recorded)
    # A checkpoint that recorded its shards by file name (before shard ids) is compared by file name.
    as_written_before_shard_ids(step_4)
    check(f"data.train_shards={tmp_path}/moved.txt")
    with pytest.raises(ConfigError, match=re.escape(f"data.train_shards names other shards, or the same in another "
                                                    f"order, than the 16 checkpoint '{step_4}' was trained on: {ahead}")):
        check(f"data.train_shards={tmp_path}/reordered.txt")

    # One rank's file lost, or cut short by a partial copy: refused by name, not deep in the load.
    broken = tmp_path / "copy" / "step_4"
    shutil.copytree(step_4, broken)
    os.truncate(broken / "__0_0.distcp", 1000)
    with pytest.raises(ConfigError, match=re.escape(f"checkpoint '{broken}' is incomplete: its file '__0_0.distcp' "
                                                    "has 1000 of its ")):
        check(f"train.resume={broken}", run=tmp_path / "new")
    (broken / "__0_0.distcp").unlink()
    with pytest.raises(ConfigError, match="its file '__0_0.distcp' is missing; restore it, or move the checkpoint"):
        check(f"train.resume={broken}", run=tmp_path / "new")
    # What a crash can leave of files the disk had not stored yet: refused by name too, not a traceback.
    for name in ("train_state.json", "model.json", ".metadata"):
        shutil.rmtree(broken)
        shutil.copytree(step_4, broken)
        os.truncate(broken / name, 0)
        with pytest.raises(ConfigError, match=re.escape(f"checkpoint '{broken}' is incomplete: its file '{name}' "
                                                        "cannot be read (")):
            check(f"train.resume={broken}", run=tmp_path / "new")

    longer = run_pretrain(0, [*common, "train.steps=8", "data.num_workers=0", "data.micro_batch_size=16",
                              "model.drop_path_rate=0.1", "model.grad_checkpointing=true"])
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert (f"resuming with a config changed since {step_4}, so this run differs from the one it continues: "
            "model.drop_path_rate: 0.0 -> 0.1; train.steps: 4 -> 8; the learning rate of step 5 is 0.00123, where the checkpoint's schedule has 1e-05 "
            "(the cosine decay now ends at train.steps=8)\n") in longer.stderr
    # Named, step_4 is passed over for the run's newer step_8, whose refusal says why it is the one checked.
    step_8 = run_dir / "checkpoints" / "step_8"
    with pytest.raises(ConfigError, match=re.escape(f"train.steps=6, but checkpoint '{step_8}' is at step 8 already: give "
                                                    f"train.steps >= 8 (train.resume='{step_4}' is older than this run's "
                                                    "newest checkpoint, which a resume takes: move the newer ones away")):
        check(f"train.resume={step_4}", "train.steps=6")


def test_a_resume_onto_shards_written_again_under_their_names_stops_naming_the_shard(demo_shards, tmp_path):
    """Shards written again (make-shards run anew over other images, a dataset's next version) keep
    their names, all that the resume's check of the shard list compares: the resume went on without
    a word, its stream positions indexing other samples. A checkpoint's positions hold the digest of
    each stream's sample before them: the resumed stream finds another there and stops the run (exit
    2, marked in FATAL: a retry would meet it again), through a loader worker on 2 ranks, naming the
    shard. With the shards restored, it resumes exactly."""
    data = tmp_path / "data"
    shutil.copytree(Path(expand_urls(demo_shards["train"])[0]).parent, data)
    run_dir = tmp_path / "run"
    common = [f"data.train_shards={data}/train-{{000000..000015}}.tar", *EXACT, "data.micro_batch_size=32",
              "data.shuffle_block=8", "data.num_workers=1", "train.steps=8"]
    reference = run_pretrain(0, [*common, f"run.dir={tmp_path / 'ref'}"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    first = run_pretrain(0, [*common, f"run.dir={run_dir}", "train.steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]

    shutil.copytree(data, tmp_path / "kept")
    other = write_demo_dataset(tmp_path / "other", train_per_class=64, val_per_class=8, samples_per_shard=32, seed=1)
    for url in expand_urls(other["train"]):  # as many shards of as many samples, under the same names
        shutil.copy(url, data)
    resumed = run_pretrain(2, [*common, f"run.dir={run_dir}"])
    assert resumed.returncode != 0 and "exitcode  : 2" in resumed.stderr, resumed.stderr[-3000:]
    message = re.search(r"data stream \d+ resumes in shard '(.*?)' at \(0, 0, 16\) \(epoch, shard, offset\), but the "
                        r"sample there is not the one the checkpointed run read \(the shard holds other samples\)",
                        resumed.stderr)
    assert message and Path(message[1]).parent == data, resumed.stderr[-3000:]
    assert "written again under its name since" in (run_dir / "FATAL").read_text()

    shutil.rmtree(data)
    (tmp_path / "kept").rename(data)
    restored = run_pretrain(2, [*common, f"run.dir={run_dir}"])
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert loss_curve(run_dir) == loss_curve(tmp_path / "ref")
    assert positions(run_dir, 8) == positions(tmp_path / "ref", 8)


# A shard through a storage that fails for a while: while the file `outage` exists, it is cut
# after its first 14 samples (two tar members each), a read error.
FAILING_SHARD = """
import os, sys, tarfile
shard, outage = sys.argv[1:]
data = open(shard, "rb").read()
sys.stdout.buffer.write(data[:tarfile.open(shard).getmembers()[28].offset] if os.path.exists(outage) else data)
"""


def test_a_resume_in_the_block_a_passing_read_error_cut_goes_on(tmp_path):
    """A storage outage cut the shard in the checkpointed run, in the block of samples its stream's
    position lies in; the resume reads the shard whole, whose block is then another (more samples,
    shuffled otherwise), not the one the run read. The run is not told that the shard was written
    again under its name (ShardChanged: exit 2, FATAL, never retried): it goes on, as before the
    positions held digests, for the uninterrupted run's read cannot be had again."""
    shard = tmp_path / "s0.tar"
    write_shard(shard, [{"__key__": f"s0_{i:02d}", "png": png_bytes((0, i * 10, 0)), "cls": i % 8} for i in range(16)])
    (tmp_path / "fail.py").write_text(FAILING_SHARD)
    outage = tmp_path / "outage"
    piped = f"pipe:{sys.executable} {tmp_path / 'fail.py'} {shard} {outage}"
    common = [*EXACT, "data.streams=1", "data.num_workers=0", "data.shuffle_block=8", "train.global_batch_size=4",
              "data.micro_batch_size=4", f"data.train_shards={json.dumps([piped])}", f"run.dir={tmp_path / 'run'}"]
    outage.touch()
    first = run_pretrain(0, [*common, "train.steps=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "the rest of the shard is unreadable" in first.stderr, first.stderr[-3000:]
    epoch, shard_index, offset = positions(tmp_path / "run", 3)["0"][:3]
    assert (epoch, shard_index) == (0, 0) and 8 < offset <= 15  # in the block the outage cut

    outage.unlink()
    resumed = run_pretrain(0, [*common, "train.steps=5"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [s for s, _ in loss_curve(tmp_path / "run")] == list(range(1, 6))


def test_a_resume_reports_the_learning_rate_its_changes_make_and_why():
    """Half-way down the cosine (step 30 of 40 after 20 warmup steps) the lr is halfway between
    optim.lr and optim.min_lr; the decay's new end is named only where train.steps moved it."""
    from vitdist.config import to_dict

    state = {"config": to_dict(load_config(TINY, ["train.steps=40"])), "step": 30}  # optim.lr 2e-3, min_lr 1e-5
    assert changes(load_config(TINY, ["train.steps=40", "optim.lr=0.004"]), state) == [
        "optim.lr: 0.002 -> 0.004", "the learning rate of step 31 is 0.00201, where the checkpoint's schedule has 0.00101"]
    assert changes(load_config(TINY, ["train.steps=80"]), state) == [  # 1e-5 + 1.99e-3 x (1 + cos(pi/6)) / 2
        "train.steps: 40 -> 80", "the learning rate of step 31 is 0.00187, where the checkpoint's schedule has 0.00101 "
        "(the cosine decay now ends at train.steps=80)"]
    # Keys that the checkpoint's vitdist did not have are no change of the user's: said apart.
    for key in ("jpeg_reduce", "aug_repeats"):
        del state["config"]["data"][key]
    assert changes(load_config(TINY, ["train.steps=40"]), state) == []
    assert added_keys(load_config(TINY, ["train.steps=40"]), state) == ["data.aug_repeats=1", "data.jpeg_reduce=True"]


def test_shard_ids_keep_what_differs_between_shards_and_drop_what_a_move_changes():
    def ids(urls):
        return shard_ids(list(braceexpand(urls)) if isinstance(urls, str) else urls)

    names = ["train-000000.tar", "train-000001.tar"]
    for where in ("/data/in21k/", "/mnt/copy/", "pipe:aws s3 cp s3://bucket/in21k/", "https://host/data/",
                  "gs://bucket/", "hf://datasets/org/name/"):
        assert ids(f"{where}train-{{000000..000001}}.tar") == names, where
    assert ids("pipe:aws s3 cp s3://bucket/train-{000000..000001}.tar -") == names
    assert ids("pipe:curl -sL https://host/data/train-{000000..000001}.tar | zstd -d") == names
    assert ids("https://host/get?shard={0..1}") == ["get?shard=0", "get?shard=1"]
    assert ids(["https://host/train.tar?part=0", "https://host/train.tar?part=1"]) == ["train.tar?part=0", "train.tar?part=1"]
    assert ids(["/data/laion/train-0.tar", "/data/coyo/train-0.tar"]) == ["laion/train-0.tar", "coyo/train-0.tar"]
    assert ids(["pipe:aws s3 cp s3://bucket/train-000000.tar -"]) == ["train-000000.tar -"]


def as_written_before_shard_ids(checkpoint: Path) -> None:
    """Rewrite the checkpoint's data_order as vitdist recorded it before shard ids: its shards by the
    last path part of their URLs."""
    state = json.loads((checkpoint / "train_state.json").read_text())
    names = "\n".join(url.rstrip("/").rsplit("/", 1)[-1] for url in expand_urls(state["config"]["data"]["train_shards"]))
    state["data_order"] = {**{key: state["data_order"][key] for key in ("seed", "shuffle_block", "shards")},
                           "shard_names_sha256": hashlib.sha256(names.encode()).hexdigest()}
    (checkpoint / "train_state.json").write_text(json.dumps(state))


def test_a_resume_tells_pipe_commands_apart_by_the_file_they_read(demo_shards, tmp_path):
    """The last path part of a pipe: command is the same for every shard ('-' for `aws s3 cp
    s3://bucket/train-000001.tar -`, 'null' for `cat <shard> | tee /dev/null` here): compared by it,
    a reordered list, or one with a shard replaced, resumed, reading other samples than the uninterrupted
    run. Each is refused, naming what changed; the same shards in another directory, or read
    locally, resume. A checkpoint that recorded only those last parts resumes with the same
    data.train_shards, and is refused with another, which it cannot tell from its own."""
    urls = list(braceexpand(demo_shards["train"]))
    (tmp_path / "moved").mkdir()
    moved = [shutil.copy(url, tmp_path / "moved") for url in urls]

    def piped(shards):
        return f"data.train_shards={json.dumps([f'pipe:cat {url} | tee /dev/null' for url in shards])}"

    run_dir = tmp_path / "run"
    common = [*EXACT, "train.steps=2", f"run.dir={run_dir}"]
    first = run_pretrain(0, [*common, piped(urls)])
    assert first.returncode == 0, first.stderr[-3000:]
    step_2 = run_dir / "checkpoints" / "step_2"

    def check(shards):
        preflight(load_config(TINY, [*common, shards]), world_size=1)

    ahead = "its data stream positions would index another sample order"
    refusals = {
        piped(urls[1:] + urls[:1]): f"data.train_shards names the 16 shards checkpoint '{step_2}' was trained on, in "
                                    f"another order: {ahead}",
        piped([*urls[:15], moved[0]]): f"data.train_shards names other shards than the 16 checkpoint '{step_2}' was "
                                       f"trained on: {ahead}",
        piped([*urls, moved[0]]): f"data.train_shards names 17 shards, checkpoint '{step_2}' was trained on 16: {ahead}",
    }
    for shards, message in refusals.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            check(shards)
    with pytest.raises(ConfigError, match=re.escape(f"here 'train-000001.tar' for 'pipe:cat {urls[1]} | tee /dev/null'")):
        check(piped(urls[1:] + urls[:1]))
    check(piped(moved))
    check(f"data.train_shards={json.dumps(moved)}")

    as_written_before_shard_ids(step_2)
    check(piped(urls))
    with pytest.raises(ConfigError, match=re.escape(
            f"data.train_shards={[f'pipe:cat {url} | tee /dev/null' for url in moved]!r}, but checkpoint '{step_2}' "
            f"was trained with data.train_shards={[f'pipe:cat {url} | tee /dev/null' for url in urls]!r}; it records "
            "its shards by file name only, 'null' for more than one of them")):
        check(piped(moved))

    state = json.loads((step_2 / "train_state.json").read_text())
    del state["data_order"]  # as vitdist wrote it before it recorded the order (2026-11-23): checked it not, unsaid
    (step_2 / "train_state.json").write_text(json.dumps(state))
    assert preflight(load_config(TINY, [*common, piped(urls[1:] + urls[:1]), "data.seed=7"]), world_size=1) == [
        f"checkpoint '{step_2}' does not record the data order it was trained in (written by an earlier vitdist): "
        "data.train_shards, data.seed and data.shuffle_block cannot be checked against it; if any is not what it was "
        f"trained with, {ahead}: samples repeated or never seen"]


def test_a_resume_that_evaluates_worse_keeps_the_better_best_weights(demo_shards, tmp_path):
    """The run evaluates at steps 3 and 6 and writes best.safetensors; it is then resumed from its
    step-2 checkpoint, whose best scores predate both evaluations, with a learning rate of 0 (as a
    resume that is not bitwise may do worse): its evaluations of the step-2 weights must not replace
    better weights. The file records the step and val/top1 of the weights it holds."""
    common = [*EXACT, *shard_overrides(demo_shards), "train.steps=6", "ckpt.every_steps=2", "ckpt.keep=0",
              "train.eval_every_steps=3", f"run.dir={tmp_path}"]
    first = run_pretrain(0, common)
    assert first.returncode == 0, first.stderr[-3000:]
    evaluated = dict(read_scalars(tmp_path / "tb")["val/top1"])
    losses = dict(read_scalars(tmp_path / "tb")["val/loss"])
    for step in (4, 6):  # as if lost, or moved away to go back to step 2
        shutil.rmtree(tmp_path / "checkpoints" / f"step_{step}")
    again = run_pretrain(0, [*common, "optim.lr=0", "optim.min_lr=0"])
    assert again.returncode == 0, again.stderr[-3000:]
    evaluated_again = dict(read_scalars(tmp_path / "tb")["val/top1"])
    assert evaluated_again.keys() == {3, 6} and max(evaluated_again.values()) < max(evaluated.values())

    best = tmp_path / "best.safetensors"
    step_2 = export(tmp_path / "checkpoints" / "step_2", tmp_path / "step_2.safetensors")
    assert not torch.equal(load_file(best)["head.weight"], load_file(step_2)["head.weight"])
    best_step = max(evaluated, key=lambda step: (evaluated[step], -losses[step]))  # of equal top-1, the lower loss
    with safe_open(str(best), "pt") as f:
        assert f.metadata()["step"] == str(best_step)
        assert float(f.metadata()["val_top1"]) == pytest.approx(evaluated[best_step])
    info = json.loads(best.with_suffix(".json").read_text())
    assert info["step"] == best_step and info["val_top1"] == pytest.approx(evaluated[best_step])

    kept = best.read_bytes()
    done = run_pretrain(0, [*common, "optim.lr=0", "optim.min_lr=0"])  # the same command once more
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step_6 is at train.steps=6 already: nothing to train, the run ends there (give a larger train.steps to train on)" in done.stderr
    assert dict(read_scalars(tmp_path / "tb")["val/top1"]) == evaluated_again and best.read_bytes() == kept


def test_a_resume_with_another_global_batch_judges_bad_samples_by_the_samples_trained_on(demo_shards, tmp_path):
    """The bad fraction took the samples trained on for the steps times the global batch now: resumed
    at step 10 of 64 samples with a batch of 16, the 672 samples trained on by step 12 counted as
    192, and a run with 1.8% bad samples stopped at data.max_skip_frac=0.05 (exit 2, not retried).
    Checkpoints record the samples trained on; one that does not (written before) counts its steps
    at the global batch of its own config."""
    write_shard(tmp_path / "bad.tar", [{"__key__": f"bad{i}", "jpg": b"not a jpeg", "cls": 1} for i in range(6)])
    run_dir = tmp_path / "run"
    common = [f"data.train_shards={json.dumps([*expand_urls(demo_shards['train']), str(tmp_path / 'bad.tar')])}",
              "data.val_shards=null", "data.max_skip_frac=0.05", "log.every_steps=10", "ckpt.every_steps=10",
              "ckpt.keep=0", f"run.dir={run_dir}"]

    def run(steps: int, batch: int) -> dict:
        done = run_pretrain(0, [*common, f"train.steps={steps}", f"train.global_batch_size={batch}",
                                f"data.micro_batch_size={batch}"])
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((run_dir / "checkpoints" / f"step_{steps}" / "train_state.json").read_text())

    assert run(10, 64)["skipped"] == {"undecodable": 12}  # the bad shard read twice
    assert run(12, 16)["trained_samples"] == 10 * 64 + 2 * 16
    assert run(14, 32)["trained_samples"] == 10 * 64 + 2 * 16 + 2 * 32  # carried on, not steps x a batch
    shutil.rmtree(run_dir / "checkpoints" / "step_14")

    shutil.rmtree(run_dir / "checkpoints" / "step_12")
    step_10 = run_dir / "checkpoints" / "step_10" / "train_state.json"
    state = json.loads(step_10.read_text())
    del state["trained_samples"]  # as a checkpoint written before they were counted
    step_10.write_text(json.dumps(state))
    assert run(12, 16)["trained_samples"] == 10 * 64 + 2 * 16


def test_a_fresh_run_sets_an_earlier_runs_best_weights_aside_and_keeps_its_own(demo_shards, tmp_path):
    """A run with no checkpoint of its run.dir's own to resume (one killed before its first, or whose
    checkpoints were moved away) starts afresh: TensorBoard hides the earlier run's curves, and its
    best weights are no longer the bar that this run's must beat, which kept a worse run from ever
    writing its own, leaving another run's weights and scores under its name. They are renamed,
    beside any set aside before, with a warning."""
    from vitdist.export import header, write_safetensors
    from vitdist.model import build_model
    from vitdist.model import model_meta

    common = [*EXACT, *shard_overrides(demo_shards), "train.steps=2", f"run.dir={tmp_path}"]
    cfg = load_config(TINY, common)
    earlier = {**model_meta(cfg.model, cfg.data), "step": 500, "val_top1": 1.0, "val_loss": 0.01}
    write_safetensors(build_model(cfg.model).state_dict(), earlier, tmp_path / "best.safetensors")
    (tmp_path / "best.earlier-1.safetensors").write_bytes(b"set aside before")

    fresh = run_pretrain(0, common)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    [(step, top1)] = read_scalars(tmp_path / "tb")["val/top1"]
    assert header(tmp_path / "best.safetensors")["step"] == "2" == str(step)
    assert json.loads((tmp_path / "best.json").read_text())["val_top1"] == pytest.approx(top1)
    aside = tmp_path / "best.earlier-2.safetensors"
    assert header(aside)["step"] == "500" and json.loads(aside.with_suffix(".json").read_text())["step"] == 500
    assert (tmp_path / "best.earlier-1.safetensors").read_bytes() == b"set aside before"
    assert (f"'{tmp_path / 'best.safetensors'}' holds the best weights of an earlier run (step 500, val/top1 1.0), "
            f"and this run starts afresh: they are not the ones to beat, and are moved to '{aside}'") in fresh.stderr


def test_a_resume_that_switches_where_jpegs_are_decoded_warns(demo_shards, tmp_path):
    """A JPEG broken past its header is skipped by data.decode: cpu, which takes its stream's next
    sample instead, and replaced by a copy of another sample of its batch by gpu: from the first one on, the two put other
    samples in each step (tests/test_gpu_decode.py runs gpu on the CPU). A resume that switches
    them, explicitly or by `auto` on a machine with or without CUDA, went on without a word; it
    warns, with the data.decode each resolved to. `auto` resolving as before does not."""
    common = [*EXACT, *shard_overrides(demo_shards), f"run.dir={tmp_path}"]
    resolved = {"cpu": "cpu", "gpu": "gpu", "auto": "gpu" if torch.cuda.is_available() else "cpu"}
    before = "cpu"
    for steps, decode in ((2, "cpu"), (4, "auto"), (6, "gpu")):
        run = run_pretrain(0, [*common, f"train.steps={steps}", f"data.decode={decode}"])
        assert run.returncode == 0, run.stderr[-3000:]
        switched = (f"data.decode: '{before}' -> '{resolved[decode]}' (as resolved on each machine): a JPEG broken "
                    "past its header")
        assert (switched in run.stderr) == (before != resolved[decode]), run.stderr[-3000:]
        before = resolved[decode]


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_each_step_once(demo_shards, tmp_path):
    common = [*shard_overrides(demo_shards), *EXACT, "train.steps=2", f"run.dir={tmp_path}"]
    first = run_pretrain(0, common)
    assert first.returncode == 0, first.stderr[-3000:]
    # As if killed while writing its first checkpoint: that save is passed over, and said to be.
    (tmp_path / "checkpoints" / "step_2").rename(tmp_path / "checkpoints" / "step_2.tmp")
    again = run_pretrain(0, common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"not resuming from {tmp_path / 'checkpoints' / 'step_2.tmp'}: a save that did not finish"
            in again.stderr), again.stderr[-3000:]
    assert [s for s, _ in loss_curve(tmp_path)] == [1, 2]


def test_a_resume_onto_an_image_folder_of_other_images_is_refused_even_converted_again(tmp_path):
    """A run on an ImageFolder trains on its conversion into <run.dir>/shards/train. The folder
    changed since was refused only by that conversion's manifest: deleted, as the refusal allowed,
    the changed folder was converted again into shards of the same names, and the resume went on
    without a word over other samples than the checkpoint's stream positions index. Its checkpoints
    record the images they were trained on: such a resume is refused, whether converted again or
    not, naming what changed. With the images restored, the deleted conversion is made again, and
    the resume is exact."""
    from PIL import Image

    images, run_dir = tmp_path / "images", tmp_path / "run"
    write_png_folder(images, per_class=6)  # 18 images: one or two per stream
    common = [f"data.train_shards={images}", *EXACT, "ckpt.keep=0", "data.num_workers=0", f"run.dir={run_dir}",
              "train.steps=8"]
    first = run_pretrain(0, common)
    assert first.returncode == 0, first.stderr[-3000:]
    uninterrupted = loss_curve(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_8")  # as if killed before it
    step_4 = run_dir / "checkpoints" / "step_4"

    def check():
        preflight(load_config(TINY, common), world_size=1)

    def refused(what: str) -> str:
        return (f"data.train_shards: '{images}' is not the ImageFolder checkpoint '{step_4}' was trained on ({what}): "
                "converted again, its data stream positions would index another sample order")

    added = images / "bee" / "bee.6.png"
    Image.new("RGB", (16, 16), (80, 60, 0)).save(added)
    with pytest.raises(ConfigError, match=re.escape(refused("19 images where there were 18"))):
        check()
    shutil.rmtree(run_dir / "shards" / "train")  # as the conversion's refusal allowed
    again = run_pretrain(0, common)
    assert again.returncode == 2, again.stderr[-3000:]
    assert refused("19 images where there were 18") in again.stderr
    assert not (run_dir / "shards" / "train").exists()  # refused before converting
    added.unlink()
    replaced = images / "ant" / "ant.0.png"
    original = replaced.read_bytes()
    Image.new("RGB", (20, 20), (0, 0, 0)).save(replaced)
    with pytest.raises(ConfigError, match=re.escape(refused(
            "the same 18 images by count, but other files (renamed, replaced or of another size)"))):
        check()
    write_png_folder(images, classes=("dog",), per_class=1)
    with pytest.raises(ConfigError, match=re.escape(refused(
            "class folders ['dog'] added; 19 images where there were 18"))):
        check()

    shutil.rmtree(images / "dog")
    replaced.write_bytes(original)
    resumed = run_pretrain(0, common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {step_4} at step 4" in resumed.stderr and "converting ImageFolder" in resumed.stderr
    assert loss_curve(run_dir) == uninterrupted  # bitwise: the same samples at the same positions

    # A checkpoint that does not record its images, or no data order at all (earlier vitdists'), is
    # compared through the run's conversion, and refused when there is none to compare with.
    step_8 = run_dir / "checkpoints" / "step_8"
    written = json.loads((step_8 / "train_state.json").read_text())
    assert written["data_order"]["image_folder"]["images"] == 18
    for older in ("data_order", "image_folder"):
        state = json.loads(json.dumps(written))
        if older == "data_order":
            del state["data_order"]
        else:
            del state["data_order"]["image_folder"]
        (step_8 / "train_state.json").write_text(json.dumps(state))
        assert preflight(load_config(TINY, common), world_size=1) == ([
            f"checkpoint '{step_8}' does not record the data order it was trained in (written by an earlier vitdist): "
            "data.shuffle_block cannot be checked against it; if it is not what it was trained with, its data stream "
            "positions would index another sample order: samples repeated or never seen"] if older == "data_order" else [])
        Image.new("RGB", (16, 16), (80, 60, 0)).save(added)
        with pytest.raises(ConfigError, match=re.escape(
                f"'{images}' is not the ImageFolder checkpoint '{step_8}' was trained on (19 images where there were 18)")):
            check()
        added.unlink()
    shutil.rmtree(run_dir / "shards" / "train")
    with pytest.raises(ConfigError, match=re.escape(
            f"data.train_shards is the ImageFolder '{images}', but checkpoint '{step_8}' does not record the images it "
            f"was trained on (trained on shards, or by an earlier vitdist), and '{run_dir / 'shards' / 'train'}' holds "
            "no conversion of them")):
        check()
