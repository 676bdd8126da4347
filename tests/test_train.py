"""Real training runs: torchrun processes, gloo process groups, shards, TensorBoard files."""

import json
import math
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import yaml
import pytest
import timm
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import TINY, png_bytes, read_scalars, run_pretrain, shard_overrides, vitdist_cli, write_shard
from vitdist.config import ConfigError, to_dict
from vitdist.config_yaml import load_config
from vitdist.data import TrainLoader
from vitdist.shard_list import expand_urls
from vitdist.model import build_model, timm_kwargs, train_flops_per_image
from vitdist.schedule import lr_at

pytestmark = pytest.mark.slow

TAGS = {"train/loss", "train/lr", "train/grad_norm", "perf/images_per_sec", "perf/data_wait_frac", "perf/mfu", "data/skipped",
        "val/loss", "val/top1"}


def test_pretrain_on_2_ranks_then_resume(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*shard_overrides(demo_shards), f"run.dir={run_dir}", "train.global_batch_size=64",
                 "data.micro_batch_size=32", "optim.warmup_steps=5", "log.every_steps=5",
                 "train.eval_every_steps=15", "ckpt.every_steps=15"]
    first = run_pretrain(2, [*overrides, "train.steps=30"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 rank(s) on cpu | global batch 64 = 2 x 32 x 1 accumulation step(s)" in first.stdout
    assert "step 30/30 | loss " in first.stdout and f"tensorboard --logdir {run_dir / 'tb'}" in first.stdout

    curves = read_scalars(run_dir / "tb")
    assert TAGS <= set(curves)
    assert [s for s, _ in curves["train/loss"]] == [1, 5, 10, 15, 20, 25, 30]  # the first step's line too
    assert [s for s, _ in curves["val/top1"]] == [15, 30]
    best_top1 = max(v for _, v in curves["val/top1"])
    best = re.search(rf"^best: {re.escape(str(run_dir / 'best.safetensors'))} \(step (\d+), val/top1 (\S+)\)$", first.stdout,
                     re.M)
    assert best and best[2] == f"{best_top1:.2%}" and (int(best[1]), best_top1) in curves["val/top1"], first.stdout[-500:]
    losses = [v for _, v in curves["train/loss"]]
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(0 <= v <= 1 for _, v in curves["perf/data_wait_frac"])
    assert all(v > 0 for _, v in curves["perf/images_per_sec"])
    assert all(0 < v < 1 for _, v in curves["perf/mfu"])
    # perf/images_per_sec counts every rank's images (64 a step) over the window's time: here against
    # the events' times, for windows that neither follow nor hold a checkpoint or validation. perf/mfu
    # is per device: the FLOPs of those images over 2 devices' peak (the first line prints it).
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    wall = {e.step: e.wall_time for e in events.Scalars("train/loss")}
    per_sec = dict(curves["perf/images_per_sec"])
    for end in (10, 25):
        assert 0.7 < per_sec[end] * (wall[end] - wall[end - 5]) / (5 * 64) < 1.4, (end, per_sec, wall)
    peak = float(re.search(r"mfu against (\S+) TFLOP/s per device \(measured\)", first.stdout)[1]) * 1e12
    flops = train_flops_per_image(build_model(load_config(run_dir / "config.yaml").model))
    assert [v for _, v in curves["perf/mfu"]] == pytest.approx([v * flops / peak / 2 for v in per_sec.values()],
                                                                rel=6e-3)
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1  # rank 0 writes, alone
    # The console shows what TensorBoard holds; the lr is the one the logged step trained at (its
    # index counts from 0), not the next step's.
    printed = re.findall(r"step (\d+)/30 \| loss (\S+) \| lr (\S+) \|", first.stdout)
    assert printed == [(str(s), f"{v:.4f}", f"{lr:.2e}") for (s, v), (_, lr) in zip(curves["train/loss"],
                                                                                 curves["train/lr"])]
    schedule = [lr_at(s - 1, lr=2e-3, min_lr=1e-5, warmup_steps=5, total_steps=30) for s, _ in curves["train/lr"]]
    assert [v for _, v in curves["train/lr"]] == pytest.approx(schedule, rel=1e-6)

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved == to_dict(load_config(run_dir / "config.yaml")) and saved["train"]["steps"] == 30
    assert saved["run"]["dir"] == str(run_dir)

    # The checkpoint is timm's model under the same name: convert, load strictly into timm.
    ckpt = run_dir / "checkpoints" / "step_30"
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step_15", "step_30"]
    positions = json.loads((ckpt / "train_state.json").read_text())["data_positions"]
    assert sorted(map(int, positions)) == list(range(16))  # every stream, from both ranks
    # Each stream gave 30 steps x 4 samples: 3 epochs of its one 32-sample shard, and 24 more.
    assert all(p[:3] == [3, 0, 24] for p in positions.values()), positions
    dcp_to_torch_save(ckpt, tmp_path / "flat.pt")
    weights = torch.load(tmp_path / "flat.pt", weights_only=True)["model"]
    cfg = load_config(run_dir / "config.yaml")
    reference = timm.create_model(cfg.model.arch, **timm_kwargs(cfg.model))
    reference.load_state_dict(weights, strict=True)

    # The single-file export: timm rebuilds the model from the JSON and loads it strictly.
    export = vitdist_cli("export", "--checkpoint", ckpt, "--out", tmp_path / "vit.safetensors")
    assert export.returncode == 0, export.stderr
    meta = json.loads((tmp_path / "vit.json").read_text())
    assert meta["arch"] == cfg.model.arch and meta["img_size"] == 32 and meta["num_classes"] == 8
    exported = timm.create_model(meta["arch"], **meta["timm_kwargs"])
    exported.load_state_dict(load_file(tmp_path / "vit.safetensors"), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(exported.eval()(x), reference.eval()(x), rtol=0, atol=0)

    resumed = run_pretrain(2, [*overrides, "train.steps=40"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt} at step 30" in resumed.stderr
    assert "steps 30 -> 40" in resumed.stdout and "step 5/40" not in resumed.stdout
    curves = read_scalars(run_dir / "tb")
    assert [s for s, _ in curves["train/loss"]] == [1, 5, 10, 15, 20, 25, 30, 35, 40]  # a resume's first, 31, not
    resumed_lr = [lr_at(s - 1, lr=2e-3, min_lr=1e-5, warmup_steps=5, total_steps=40) for s in (35, 40)]
    assert [v for _, v in curves["train/lr"]] == pytest.approx([*schedule, *resumed_lr], rel=1e-6)  # the longer cosine
    assert (run_dir / "checkpoints" / "step_40" / ".metadata").is_file()


def test_bad_samples_are_counted_by_kind_over_ranks_and_resumed(demo_shards, tmp_path):
    bad = [{"__key__": f"bad{i}", "jpg": b"\xff\xd8 not really a jpeg", "cls": 1} for i in range(4)]
    bad += [{"__key__": f"tiny{i}", "png": png_bytes((9, 9, 9), size=(1, 1)), "cls": 1} for i in range(2)]
    bad += [{"__key__": "nolabel", "png": png_bytes((9, 9, 9))}]
    write_shard(tmp_path / "bad.tar", bad)
    shards = [*expand_urls(demo_shards["train"]), str(tmp_path / "bad.tar")]
    overrides = [f"data.train_shards={json.dumps(shards)}", "data.val_shards=null", f"run.dir={tmp_path}",
                 "log.every_steps=10", "ckpt.every_steps=0", "train.global_batch_size=64", "data.micro_batch_size=32"]
    run = run_pretrain(2, [*overrides, "train.steps=15"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped sample 'bad0' in " in run.stderr and "undecodable image" in run.stderr
    assert "skipped sample 'tiny0' in " in run.stderr and "[too_small]" in run.stderr
    curves = read_scalars(tmp_path / "tb")
    kinds = {"undecodable": 4, "too_small": 2, "no_label": 1}  # per read of the bad shard
    assert {tag for tag in curves if tag.startswith("data/skipped_")} == {f"data/skipped_{kind}" for kind in kinds}
    # A stream reads the whole bad shard within one chunk (it gives no sample): every read counts
    # each kind in full, summed over both ranks. 15 steps x 64 samples is about 2 passes.
    # Step 1's line may come before the first read of it.
    passes = [v for s, v in curves["data/skipped_no_label"] if s > 1]
    assert 1 <= passes[0] <= passes[-1] <= 3
    for kind, per_pass in kinds.items():
        assert [v for s, v in curves[f"data/skipped_{kind}"] if s > 1] == [per_pass * n for n in passes], kind
    assert [v for s, v in curves["data/skipped"] if s > 1] == [7 * n for n in passes]
    state = json.loads((tmp_path / "checkpoints" / "step_15" / "train_state.json").read_text())
    assert state["skipped"] == {kind: per_pass * passes[-1] for kind, per_pass in kinds.items()}

    # Resumed in the middle of a log window (steps 16-20), each bad sample is still counted once:
    # at step 30, as many as one uninterrupted read of 30 steps meets.
    resumed = run_pretrain(2, [*overrides, "train.steps=30"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = read_scalars(tmp_path / "tb")
    assert [s for s, _ in after["data/skipped"]] == [1, 10, 15, 20, 30]
    assert [v for s, v in after["data/skipped_undecodable"] if s > 1][:2] == [4 * n for n in passes]
    cfg = load_config(TINY, [*overrides, "data.num_workers=0"])
    batches = iter(TrainLoader(cfg.data, cfg.model.img_size, cfg.model.num_classes, 64, rank=0, world_size=1))
    uninterrupted = sum((next(batches)["skipped"] for _ in range(30)), Counter())
    assert {kind: after[f"data/skipped_{kind}"][-1][1] for kind in kinds} == uninterrupted


@pytest.mark.parametrize("repeats", [1, 4])
def test_mostly_bad_shards_stop_every_rank(tmp_path, repeats):
    """7 of 8 samples bad: every rank stops at the first judged log step, naming the limit's key.
    With data.aug_repeats=4 a step trains on a quarter as many samples read, 4 images each: the share
    is of samples (counted by images, 7 of 8 had read as 64%)."""
    shards = []
    for s in range(16):
        samples = [{"__key__": f"s{s}good{i}", "png": png_bytes((i * 60, s * 15, 0)), "cls": i} for i in range(4)]
        samples += [{"__key__": f"s{s}bad{i}", "jpg": b"not an image", "cls": 1} for i in range(20)]
        samples += [{"__key__": f"s{s}nolabel{i}", "png": png_bytes((9, 9, 9))} for i in range(8)]
        write_shard(tmp_path / f"s{s}.tar", samples)
        shards.append(str(tmp_path / f"s{s}.tar"))
    run = run_pretrain(2, [f"data.train_shards={json.dumps(shards)}", "data.val_shards=null", f"run.dir={tmp_path}",
                           "train.steps=30", "log.every_steps=5", "ckpt.every_steps=0", "train.global_batch_size=64",
                           "data.micro_batch_size=32", f"data.aug_repeats={repeats}"], timeout_s=120)
    assert run.returncode != 0
    stops = re.findall(rf"error: (\d+\.\d)% of the samples read were bad \(\d+ skipped, {640 // repeats} trained on\), more "
                       r"than data.max_skip_frac=0.1; most were undecodable \d+, no_label \d+\.", run.stderr)
    assert len(stops) == 2 and stops[0] == stops[1] and float(stops[0]) > 80, run.stderr[-3000:]
    assert "step 10/30 | " in run.stdout and "step 15/30" not in run.stdout
    assert run.stderr.count("The newest complete checkpoint: none yet") == 2, run.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists()


def first_losses(shards, tmp_path, name, nproc, micro, workers, *extra):
    run_dir = tmp_path / name
    run = run_pretrain(nproc, [*shard_overrides(shards), "data.val_shards=null", f"run.dir={run_dir}",
                               "train.steps=3", "log.every_steps=1", "ckpt.every_steps=0", "train.precision=fp32",
                               "model.drop_path_rate=0.0", "train.label_smoothing=0.0", "optim.warmup_steps=1",
                               "train.global_batch_size=64", f"data.micro_batch_size={micro}",
                               f"data.num_workers={workers}", *extra])
    assert run.returncode == 0, run.stderr[-3000:]
    return [v for _, v in read_scalars(run_dir / "tb")["train/loss"]]


def test_one_and_two_ranks_see_the_same_global_batch(demo_shards, tmp_path):
    """1 process (no torchrun, 2 accumulation steps, 2 workers) vs 2 ranks vs 2 ranks with a
    smaller micro-batch: the same global batches, so the same losses up to float summation order.
    The last logs the first step's line, then one for steps 2 and 3 (2 ranks x 2 accumulation steps
    each): their mean."""
    single = first_losses(demo_shards, tmp_path, "one", nproc=0, micro=32, workers=2)
    double = first_losses(demo_shards, tmp_path, "two", nproc=2, micro=32, workers=1)
    small_micro = first_losses(demo_shards, tmp_path, "two_small", 2, 16, 2, "log.every_steps=3")
    assert single[0] == pytest.approx(double[0], rel=1e-5)
    assert single == pytest.approx(double, rel=1e-4) and small_micro == pytest.approx([single[0], sum(single[1:]) / 2], rel=1e-4)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_compiled_checkpointed_trains_like_eager_ddp_and_saves_clean_keys(demo_shards, tmp_path, strategy):
    """torch.compile (inductor, here on the CPU; per block under FSDP2, the whole DDP model under
    DDP) + activation checkpointing + gradient accumulation change speed and memory, not results;
    no _orig_mod. prefix reaches the checkpoint."""
    eager = first_losses(demo_shards, tmp_path, "eager", 0, 32, 1)
    compiled = first_losses(demo_shards, tmp_path, "compiled", 2, 16, 1, "train.compile=true",
                            f"dist.strategy={strategy}", "model.grad_checkpointing=true")
    assert compiled == pytest.approx(eager, rel=1e-4)
    dcp_to_torch_save(tmp_path / "compiled" / "checkpoints" / "step_3", tmp_path / "flat.pt")
    weights = torch.load(tmp_path / "flat.pt", weights_only=True)["model"]
    cfg = load_config(tmp_path / "compiled" / "config.yaml")
    timm.create_model(cfg.model.arch, **timm_kwargs(cfg.model)).load_state_dict(weights, strict=True)


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "config error: config key 'train.steps' must be int, got 'abc'"),
    ("data.micro_batch_size=48", "config error: train.global_batch_size=128 is not divisible by world size 2"),
    ("data.train_shards=/nowhere/x-{0..3}.tar", "config error: data.train_shards: 4 shard file(s) do not exist, first: '/nowhere/x-0.tar'"),
])
def test_bad_config_stops_every_rank_before_training(demo_shards, tmp_path, override, message):
    run = run_pretrain(2, [*shard_overrides(demo_shards), f"run.dir={tmp_path}", override], timeout_s=120)
    assert run.returncode != 0
    assert run.stderr.count(message) == 2, run.stderr[-3000:]
    assert not (tmp_path / "config.yaml").exists()


def test_nccl_without_a_gpu_is_refused_before_the_process_group(demo_shards, tmp_path, monkeypatch):
    """dist.backend=nccl on a machine where torch sees no GPU (a GPU config run on a CPU node) was
    let through by preflight and --check, then failed in init_process_group with a traceback and
    exit 1, which torchrun's restarts and SLURM's requeue retry."""
    from vitdist.preflight import preflight
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(TINY, [*shard_overrides(demo_shards), f"run.dir={tmp_path}", "data.val_shards=null"])
    preflight(replace(cfg, dist=replace(cfg.dist, backend="gloo")), world_size=1)
    with pytest.raises(ConfigError, match="dist.backend=nccl needs CUDA GPUs"):
        preflight(replace(cfg, dist=replace(cfg.dist, backend="nccl")), world_size=1)


def test_diverged_steps_are_skipped_counted_then_stop_without_checkpointing_them(demo_shards, tmp_path):
    """4 good steps, then a resume at lr 1e30 that checkpoints every step, asynchronously: step 5
    blows the weights up, steps 6-8 have a NaN loss on both ranks, are skipped, counted and not
    checkpointed, and the run stops at train.max_bad_steps=3. Step 5's save, still in flight when
    the run stops, is finished: the newest complete checkpoint."""
    common = [*shard_overrides(demo_shards), "data.val_shards=null", f"run.dir={tmp_path}", "ckpt.every_steps=2",
              "ckpt.keep=0", "log.every_steps=1", "train.global_batch_size=32", "data.micro_batch_size=16",
              "train.max_bad_steps=3", "optim.warmup_steps=1"]
    good = run_pretrain(0, [*common, "train.steps=4"])
    assert good.returncode == 0, good.stderr[-3000:]
    diverged = run_pretrain(2, [*common, "train.steps=30", "optim.lr=1e30", "optim.min_lr=1e30", "ckpt.every_steps=1",
                                "ckpt.async_save=true"])
    assert diverged.returncode == 1, diverged.stderr[-3000:]  # torchrun's, for any failure
    message = "error: 3 steps in a row up to step 8 had a NaN/Inf loss or gradient norm (train.max_bad_steps=3)"
    assert diverged.stderr.count(message) == 2, diverged.stderr[-3000:]
    assert (tmp_path / "FATAL").read_text().startswith(message.removeprefix("error: "))  # a retry would diverge again
    assert f"The newest complete checkpoint: {tmp_path / 'checkpoints' / 'step_5'}" in diverged.stderr
    assert "step 6: no checkpoint, the last 1 step(s) had a NaN/Inf loss or gradient norm" in diverged.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_4", "step_5"]
    scalars = read_scalars(tmp_path / "tb")
    assert dict(scalars["train/skipped_steps"]) == {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 1, 7: 2, 8: 3}
    losses = dict(scalars["train/loss"])
    assert all(math.isfinite(losses[s]) for s in range(1, 6)) and all(math.isnan(losses[s]) for s in (6, 7, 8))


def test_a_run_whose_last_steps_are_bad_but_tolerated_still_checkpoints_its_end(demo_shards, tmp_path):
    """Fewer bad steps in a row than train.max_bad_steps at the last step: the run ends as it would
    have, its final checkpoint written with the weights they left unchanged, and FINISHED names it.
    It left FINISHED naming an earlier checkpoint, every good step since lost, and a fine-tune from
    the run's checkpoints/ started from there without a word."""
    common = [*shard_overrides(demo_shards), "data.val_shards=null", f"run.dir={tmp_path}", "ckpt.every_steps=4",
              "log.every_steps=1", "train.global_batch_size=32", "data.micro_batch_size=32", "optim.warmup_steps=1"]
    assert run_pretrain(0, [*common, "train.steps=4"]).returncode == 0
    # Step 5 at lr 1e30 blows the weights up; step 6, the last, has a NaN loss: 1 bad step of 3 allowed.
    run = run_pretrain(0, [*common, "train.steps=6", "optim.lr=1e30", "optim.min_lr=1e30", "train.max_bad_steps=3"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert ("step 6, the last: its checkpoint holds the weights as they were after step 5, the last 1 step(s) having "
            "had a NaN/Inf loss or gradient norm") in run.stderr, run.stderr[-3000:]
    assert (tmp_path / "FINISHED").read_text() == f"{tmp_path / 'checkpoints' / 'step_6'}\n"
    assert dict(read_scalars(tmp_path / "tb")["train/skipped_steps"])[6] == 1


# Trains in a process of its own (no other process group in it) and prints where the host waited.
COUNT_WAITS = """
import json, sys, warnings, torch
from vitdist.config_yaml import load_config
from vitdist.train import train
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train(load_config(sys.argv[1], sys.argv[2:]))
print(json.dumps([f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host waits for a device only on a GPU")
def test_training_steps_never_make_the_host_wait_for_the_gpu(demo_shards, tmp_path):
    """A wait for the GPU in the step (a copy from pageable host memory, an .item(), a sync) leaves
    it idle until the host has queued the next step's kernels. Runs of 4 and 12 steps with the same
    log, checkpoint and validation events wait as often: the 8 more steps not once."""
    def waits(steps: int) -> list[str]:
        overrides = [*shard_overrides(demo_shards), "data.val_shards=null", "data.decode=cpu", f"train.steps={steps}",
                     "log.every_steps=1000", "ckpt.every_steps=0", f"run.dir={tmp_path / str(steps)}"]
        run = subprocess.run([sys.executable, "-c", COUNT_WAITS, str(TINY), *overrides], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.splitlines()[-1])

    few, more = waits(4), waits(12)
    assert len(more) == len(few), sorted(set(more) - set(few)) or more
    # The peak memory, logged on GPUs: of the tiny model at batch 64, more than its weights, far below a GPU.
    (_, peak), = read_scalars(tmp_path / "12" / "tb")["perf/mem_peak_gib"]
    assert 0.01 < peak < 10
