"""Validation during training: the best weights are kept by val/top1, and of equal ones by val/loss."""

import json
import math
import os
import resource
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (EXACT, TINY, background_pretrain, read_scalars, run_pretrain, shard_overrides, wait_for,
                      worker_pid)
from vitdist.config_yaml import load_config
from vitdist.data import EvalLoader
from vitdist.distributed import DistContext
from vitdist.model import build_model
from vitdist.shard_list import expand_urls
from vitdist.distributed import compute_precision
from vitdist.model import model_meta
from vitdist.export import write_safetensors
from vitdist.validation import best_to_beat, evaluate_and_keep_best


def test_of_weights_with_equal_top1_those_with_the_lower_loss_are_kept(process_group, demo_shards, tmp_path):
    """A temperature on the head (its weights and bias times a power of two: exact in floating
    point) keeps every prediction, so val/top1 ties, and changes val/loss. Evaluated at steps 1-3
    with temperatures 1, 1/2, 2, the weights kept are those of the lowest loss, whichever step
    that is; the file records their scores, and a resume reads them back as the ones to beat."""
    cfg = load_config(TINY, [*shard_overrides(demo_shards), "data.num_workers=0"])
    ctx = DistContext(0, 1, torch.device("cpu"))
    model = build_model(cfg.model)
    head = {name: p.detach().clone() for name, p in model.head.named_parameters()}
    loader = EvalLoader(cfg.data, cfg.model.img_size, cfg.model.num_classes, 0, 1)
    best, best_file, evaluated = None, tmp_path / "best.safetensors", {}
    for step, scale in ((1, 1.0), (2, 0.5), (3, 2.0)):
        with torch.no_grad():
            for name, p in model.head.named_parameters():
                p.copy_(head[name] * scale)
        scalars, best = evaluate_and_keep_best(model, loader, cfg, ctx, compute_precision(cfg, ctx.device), step, best,
                                               best_file, model_meta(cfg.model, cfg.data))
        evaluated[step] = (scalars["val/top1"], scalars["val/loss"])
    assert len({top1 for top1, _ in evaluated.values()}) == 1, evaluated  # the same predictions
    assert len({loss for _, loss in evaluated.values()}) == 3, evaluated
    lowest = min(evaluated, key=lambda step: evaluated[step][1])
    assert best == {"val_top1": evaluated[lowest][0], "val_loss": evaluated[lowest][1]}
    assert best_to_beat(best_file, None, tmp_path / "checkpoints" / "step_3", ctx) == pytest.approx(best)
    scale = {1: 1.0, 2: 0.5, 3: 2.0}[lowest]
    assert torch.equal(load_file(best_file)["head.weight"], head["weight"] * scale)


def test_an_evaluation_of_no_usable_sample_logs_no_figures_and_keeps_the_best(process_group, demo_shards, tmp_path):
    """Validation shards gone since the start (a purged scratch directory, an expired credential of a
    `pipe:` command) give every rank read errors only: the figures were 0, a val/loss of 0 in
    TensorBoard, and weights that had scored nothing better (val/top1 0, as a new model on many
    classes) were replaced by these, 'val_loss 0' recorded. Now there are no figures, and no best."""
    val = tmp_path / "val"
    val.mkdir()
    copies = [shutil.copy(url, val) for url in expand_urls(demo_shards["val"])]
    cfg = load_config(TINY, [f"data.train_shards={demo_shards['train']}", f"data.val_shards={json.dumps(copies)}",
                             "data.num_workers=0"])
    ctx = DistContext(0, 1, torch.device("cpu"))
    loader = EvalLoader(cfg.data, cfg.model.img_size, cfg.model.num_classes, 0, 1)
    shutil.rmtree(val)
    before, best_file = {"val_top1": 0.0, "val_loss": 9.0}, tmp_path / "best.safetensors"
    scalars, best = evaluate_and_keep_best(build_model(cfg.model), loader, cfg, ctx, compute_precision(cfg, ctx.device),
                                           1, before, best_file, model_meta(cfg.model, cfg.data))
    assert all(math.isnan(scalars[tag]) for tag in ("val/loss", "val/top1", "val/top5")), scalars
    assert scalars["val/skipped"] == len(copies)  # a read error for each shard
    assert best == before and not best_file.exists()


# A validation shard read through a command that notes each read in `marks`; an even-numbered read
# (a validation's: a run's config check reads it first) waits for the file `marks`.go<n>.
MARKING_SHARD = """
import os, sys, time
shard, marks = sys.argv[1:]
with open(marks, "a") as f:
    f.write("read\\n")
reads = len(open(marks).read().splitlines())
while reads % 2 == 0 and not os.path.exists(f"{marks}.go{reads}"):
    time.sleep(0.05)
sys.stdout.buffer.write(open(shard, "rb").read())
"""


def test_a_preemption_signal_interrupts_validation_and_the_resumed_run_owes_it(demo_shards, tmp_path):
    """A signal to one rank while validating step 2 stops the validation on both at the same batch: the
    run checkpoints step 2 as owing it and exits 75, with no val/ at step 2. A signal while the
    resumed run does that owed validation exits 75 again, with the checkpoint still owing it; the
    run after that validates step 2 first. Rank 0's validation waits at its first shard until the
    signal is sent, so it cannot end before."""
    (tmp_path / "marking.py").write_text(MARKING_SHARD)
    marks = tmp_path / "marks"
    reads = lambda: len(marks.read_text().splitlines()) if marks.exists() else 0
    marking = f"pipe:{sys.executable} {tmp_path / 'marking.py'} {demo_shards['train'].replace('{000000..000015}', '000000')} {marks}"
    train = shard_overrides(demo_shards)[0]
    val = [marking] + [demo_shards["train"].replace("{000000..000015}", f"{i:06d}") for i in range(1, 16)]
    common = [train, *EXACT, f"data.val_shards={json.dumps(val)}", "data.micro_batch_size=16", "train.global_batch_size=32",
              "train.eval_every_steps=2", "ckpt.every_steps=0", f"run.dir={tmp_path / 'run'}"]
    for run, read in (("first", 2), ("resumed", 4)):
        with background_pretrain(2, [*common, "train.steps=1000"], tmp_path / f"{run}.log") as process:
            wait_for(lambda: reads() >= read, process)
            os.kill(worker_pid(process.pid, 1), signal.SIGTERM)  # rank 0 learns of it from rank 1
            Path(f"{marks}.go{read}").touch()
            process.wait(timeout=120)
    first, resumed = (tmp_path / "first.log").read_text(), (tmp_path / "resumed.log").read_text()
    for rank in (0, 1):
        assert f"[rank {rank}] WARNING step 2: validation interrupted by the preemption signal" in first
        assert f"[rank {rank}] WARNING preempted at step 2: exiting with 75; the newest complete checkpoint" in first
        assert f"[rank {rank}] WARNING preempted while validating step 2: exiting with 75" in resumed
    assert "step 2: validating first" in resumed
    assert "val/top1" not in read_scalars(tmp_path / "run" / "tb")

    Path(f"{marks}.go6").touch()  # the last run's owed validation (its step 4's is the 7th read)
    last = run_pretrain(2, [*common, "train.steps=4"])
    assert last.returncode == 0, last.stderr[-3000:]
    assert "step 2: validating first" in last.stderr
    assert [s for s, _ in read_scalars(tmp_path / "run" / "tb")["val/top1"]] == [2, 4]


@pytest.mark.slow
def test_best_weights_that_cannot_be_written_stop_every_rank_or_are_logged(demo_shards, tmp_path):
    """A full disk (made by a file-size limit, as in test_checkpoint.py) at a validation step: the
    write of best.safetensors raised on rank 0 alone, a traceback, and rank 1 failed on the lost
    process group, under ckpt.on_error=continue too. Every rank stops now with the path and the
    reason (exit 1, as for a checkpoint), or under continue logs it and trains on, and the next
    validation tries again."""
    common = [*shard_overrides(demo_shards), f"run.dir={tmp_path}", "train.steps=2", "train.eval_every_steps=1",
              "ckpt.every_steps=0", "log.every_steps=1", "train.global_batch_size=32", "data.micro_batch_size=16"]

    def full_disk():  # 1 MiB: the tiny ViT's weights take 3.3 MB
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    best = tmp_path / "best.safetensors"
    stopped = run_pretrain(2, common, preexec_fn=full_disk)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert stopped.stderr.count(f"error: the best weights so far (step 1) could not be written to '{best}' (") == 2
    assert "lost contact" not in stopped.stderr and not best.exists()

    went_on = run_pretrain(2, [*common, "ckpt.on_error=continue"], preexec_fn=full_disk)
    for step in (1, 2):
        assert went_on.stderr.count(f"the best weights so far (step {step}) could not be written") == 2, step
    assert f"'{best}' keeps what it held; training goes on (ckpt.on_error=continue)" in went_on.stderr
    assert went_on.returncode == 1 and "error: checkpoint at step 2 could not be written" in went_on.stderr  # the last
    assert [step for step, _ in read_scalars(tmp_path / "tb")["val/top1"]] == [1, 2]


def test_best_weights_and_their_json_are_replaced_together_or_not_at_all(tmp_path):
    """The JSON was written after the weights had replaced the old ones: a disk that failed it left
    new weights, whose scores the run did not keep, beside the old JSON, and a later validation
    that beat the kept scores but not those weights replaced better weights with worse."""
    cfg = load_config(TINY)
    weights, meta = build_model(cfg.model).state_dict(), model_meta(cfg.model, cfg.data)
    out = tmp_path / "best.safetensors"
    write_safetensors(weights, {**meta, "step": 1, "val_top1": 0.5, "val_loss": 1.0}, out)
    before = out.read_bytes(), out.with_suffix(".json").read_bytes()
    (tmp_path / "best.json.partial").mkdir()  # where the JSON is written first: its write fails
    with pytest.raises(OSError):
        write_safetensors(weights, {**meta, "step": 2, "val_top1": 0.9, "val_loss": 0.5}, out)
    assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) == before
    assert not (tmp_path / "best.safetensors.partial").exists()

    # A write killed inside safetensors' own leaves its temporary file in a directory of its own,
    # which the next write empties; the weights get the mode the JSON does, not safetensors' 0600.
    (tmp_path / "best.json.partial").rmdir()
    (tmp_path / ".best.safetensors.writing").mkdir()
    (tmp_path / ".best.safetensors.writing" / ".tmpAbC123").write_bytes(bytes(1000))
    write_safetensors(weights, {**meta, "step": 2, "val_top1": 0.9, "val_loss": 0.5}, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.safetensors"]
    assert out.stat().st_mode == out.with_suffix(".json").stat().st_mode


@pytest.mark.slow
def test_a_run_resumed_to_end_at_its_checkpoint_validates_that_step_once_and_names_it_in_finished(demo_shards, tmp_path):
    """Stopping a run at its newest checkpoint (train.steps lowered to its step) ends it there: the
    end's validation, which the run that checkpointed did not do, is done, and the best weights kept;
    once, however often that is run. From another run.dir, FINISHED names the checkpoint resumed,
    the run's last, where it said 'no checkpoint'."""
    train, val = shard_overrides(demo_shards)
    first = tmp_path / "first"
    done = run_pretrain(1, [train, *EXACT, "data.micro_batch_size=16", "train.global_batch_size=32", "train.steps=8",
                            "ckpt.every_steps=4", "ckpt.keep=0", f"run.dir={first}"])
    assert done.returncode == 0, done.stderr[-3000:]
    for run_dir, resume in ((first, "auto"), (first, "auto"), (tmp_path / "other", first / "checkpoints" / "step_4")):
        ended = run_pretrain(1, [train, *EXACT, val, "data.micro_batch_size=16", "train.global_batch_size=32",
                                 f"train.steps={4 if resume != 'auto' else 8}", f"train.resume={resume}",
                                 f"run.dir={run_dir}"])
        assert ended.returncode == 0, ended.stderr[-3000:]
        assert [s for s, _ in read_scalars(run_dir / "tb")["val/top1"]] == [4 if resume != "auto" else 8]
        assert json.loads((run_dir / "best.json").read_text())["step"] == (4 if resume != "auto" else 8)
    assert (tmp_path / "other" / "FINISHED").read_text().strip() == str(first / "checkpoints" / "step_4")
    # A run that validated its last step, run again to end there, does not validate it again.
    for run in ("validated", "again"):
        ended = run_pretrain(1, [train, *EXACT, val, "data.micro_batch_size=16", "train.global_batch_size=32",
                                 "train.steps=4", f"run.dir={tmp_path / 'third'}"])
        assert ended.returncode == 0, ended.stderr[-3000:]
    assert "nothing to train" in ended.stderr and "validat" not in ended.stderr, ended.stderr[-3000:]
    assert [s for s, _ in read_scalars(tmp_path / "third" / "tb")["val/top1"]] == [4]
