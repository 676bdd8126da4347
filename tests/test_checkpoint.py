import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from conftest import TINY, read_scalars, run_pretrain, shard_overrides
from vitdist import checkpoint, checkpoint_read, resume
from vitdist.config import CkptConfig, ConfigError
from vitdist.config_yaml import load_config
from vitdist.handoff import HandoffError, load_pretrained
from vitdist.model import build_model, check_model
from vitdist.optim import build_optimizer
from vitdist.train_state import TrainState


def trained_pair(seed):
    cfg = load_config(TINY)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_save_then_load_restores_model_optimizer_and_state(tmp_path, process_group):
    model, optimizer = trained_pair(0)
    saver = checkpoint.Checkpointer(tmp_path, CkptConfig(keep=0), {"arch": "x"})
    path = saver.save(7, model, optimizer, {"step": 7, "data_positions": {"0": [0, 1, 2]}})
    assert path == tmp_path / "step_7" and (path / ".metadata").is_file()
    assert json.loads((path / "train_state.json").read_text()) == {"step": 7, "data_positions": {"0": [0, 1, 2]}}
    assert json.loads((path / "model.json").read_text()) == {"arch": "x"}

    other, other_optimizer = trained_pair(1)
    assert not torch.equal(other.pos_embed, model.pos_embed)
    state = checkpoint_read.load(path, other, other_optimizer)
    assert state["step"] == 7
    for (name, p), q in zip(model.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    for p, q in zip(model.parameters(), other.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(other_optimizer.state[q][key], optimizer.state[p][key], rtol=0, atol=0)


def test_a_resume_keeps_its_configs_optimizer_settings_and_the_checkpoints_moments(tmp_path, process_group):
    """optim.weight_decay, betas and eps changed for a resume are the user's to make (the resume
    warns of them): the run goes on with them, not with the values the checkpoint was trained with."""
    model, optimizer = trained_pair(0)
    path = checkpoint.Checkpointer(tmp_path, CkptConfig(keep=0), {}).save(1, model, optimizer, {"step": 1})
    changed = load_config(TINY, ["optim.weight_decay=0.3", "optim.betas=[0.8, 0.99]", "optim.eps=1e-6"])
    other = build_model(changed.model)
    other_optimizer = build_optimizer(other, changed.optim)
    checkpoint_read.load(path, other, other_optimizer)
    assert {g["weight_decay"] for g in other_optimizer.param_groups} == {0.0, 0.3}
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 for g in other_optimizer.param_groups)
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(other_optimizer.state[q]["exp_avg"], optimizer.state[p]["exp_avg"], rtol=0, atol=0)


def test_resume_picks_newest_complete_and_skips_partial(tmp_path, process_group):
    model, optimizer = trained_pair(0)
    saver = checkpoint.Checkpointer(tmp_path, CkptConfig(keep=0), {})
    for step in (10, 20):
        saver.save(step, model, optimizer, {"step": step})
    (tmp_path / "step_30.tmp").mkdir()  # a save killed half-way
    (tmp_path / "step_30.tmp" / "__0_0.distcp").write_bytes(b"partial")
    assert checkpoint.resume_path("auto", tmp_path) == tmp_path / "step_20"
    assert checkpoint.unfinished_saves(tmp_path) == [tmp_path / "step_30.tmp"]  # what that resume passes over
    assert checkpoint.resume_path("none", tmp_path / "empty") is None
    assert checkpoint.resume_path("auto", tmp_path / "empty") is None
    assert checkpoint.resume_path(str(tmp_path / "step_10"), tmp_path / "empty") == tmp_path / "step_10"
    assert checkpoint.resume_path(str(tmp_path), tmp_path / "empty") == tmp_path / "step_20"  # a run's: its newest
    # A requeued job still names the checkpoint it first resumed from, maybe pruned since; the
    # run's own newer ones win.
    assert checkpoint.resume_path(str(tmp_path / "step_10"), tmp_path) == tmp_path / "step_20"
    assert checkpoint.resume_path(str(tmp_path / "step_5"), tmp_path) == tmp_path / "step_20"
    # Named for a new run.dir, it is refused naming the complete one beside it, which was meant.
    refused = re.escape(f"step_30.tmp' is not a complete checkpoint directory (a save that did not finish: it is "
                        f"renamed without .tmp once complete); the newest complete checkpoint in '{tmp_path}' is "
                        f"'{tmp_path / 'step_20'}'")
    with pytest.raises(FileNotFoundError, match=refused):
        checkpoint.resume_path(str(tmp_path / "step_30.tmp"), tmp_path / "empty")
    # Named beside older complete ones, it is refused too: it was not pruned, and the run has not
    # checkpointed since.
    with pytest.raises(FileNotFoundError, match=refused):
        checkpoint.resume_path(str(tmp_path / "step_30.tmp"), tmp_path)
    # Also with every file written (a save killed before its rename): it was resumed from.
    shutil.rmtree(tmp_path / "step_30.tmp")
    shutil.copytree(tmp_path / "step_20", tmp_path / "step_30.tmp")
    for root in tmp_path / "empty", tmp_path:
        with pytest.raises(FileNotFoundError, match=refused):
            checkpoint.resume_path(str(tmp_path / "step_30.tmp"), root)
    # A path that is not there, a directory of no checkpoint, or a run's directory: each said as such.
    with pytest.raises(FileNotFoundError, match=re.escape("step_40' is not a complete checkpoint directory (it does not exist)")):
        checkpoint.resume_path(str(tmp_path / "step_40"), tmp_path / "empty")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape("(no .metadata)")):
        checkpoint.resume_path(str(tmp_path / "run" / "checkpoints"), tmp_path / "empty")
    shutil.copytree(tmp_path / "step_10", tmp_path / "run" / "checkpoints" / "step_10")
    with pytest.raises(FileNotFoundError, match=re.escape(f"(no .metadata; a run's checkpoints are in "
                                                          f"'{tmp_path / 'run' / 'checkpoints'}', which stands for its newest)")):
        checkpoint.resume_path(str(tmp_path / "run"), tmp_path / "empty")
    # What the refusals of a resume say, when the checkpoint checked is not the one named.
    assert checkpoint.passed_over(str(tmp_path / "step_10"), checkpoint.resume_path(str(tmp_path / "step_10"), tmp_path))
    assert not checkpoint.passed_over(str(tmp_path / "step_20"), checkpoint.resume_path(str(tmp_path / "step_20"), tmp_path))
    assert not checkpoint.passed_over(str(tmp_path), checkpoint.resume_path(str(tmp_path), tmp_path))


@pytest.mark.parametrize("fresh", ["none", "None"])  # None, as Python spells it, resumed the earlier run
def test_a_fresh_start_over_an_earlier_runs_checkpoints_is_refused_before_training(demo_shards, tmp_path, fresh):
    """Else its first save would replace the earlier step_N, `ckpt.keep` would prune its own saves
    as older than the earlier run's, and a requeue would resume the earlier run."""
    from vitdist.config import ConfigError
    from vitdist.preflight import preflight

    (tmp_path / "checkpoints" / "step_12").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_16.tmp").mkdir()
    cfg = load_config(TINY, [*shard_overrides(demo_shards), f"run.dir={tmp_path}", f"train.resume={fresh}"])
    with pytest.raises(ConfigError, match=f"train.resume=none, but '{tmp_path / 'checkpoints'}' holds checkpoints "
                                          "of an earlier run \\(newest 'step_12'\\).*give a new run.dir"):
        preflight(cfg, world_size=1)
    (tmp_path / "checkpoints" / "step_12").rmdir()  # a partial save only: nothing to lose
    preflight(cfg, world_size=1)


def test_the_train_state_comes_back_whole_from_its_json():
    """Every field, none left at its default (a resume restarted train/skipped_steps at 0 so)."""
    state = TrainState(step=5, data_positions={"0": [0, 1, 32, "ab"]}, skipped={"no_label": 2}, trained_samples=300,
                       bad_steps=3, best={"val_top1": 0.5, "val_loss": 1.25}, eval_owed=True, validated=False)
    saved = json.loads(json.dumps(state.saved(config={"train": {"global_batch_size": 64}})))
    assert TrainState.restored(saved, global_batch_size=32) == state


def test_keep_counts_complete_checkpoints_and_partials_go_once_superseded(tmp_path, process_group):
    model, optimizer = trained_pair(0)
    (tmp_path / "step_15.tmp").mkdir(parents=True)
    (tmp_path / "step_45.tmp").mkdir()
    saver = checkpoint.Checkpointer(tmp_path, CkptConfig(keep=2), {})
    for step in (9, 10, 30, 40):  # by step number: step_9 sorts after step_40 as a name
        saver.save(step, model, optimizer, {"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_30", "step_40", "step_45.tmp"]
    saver.save(45, model, optimizer, {"step": 45})  # the killed step saved again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_40", "step_45"]


def test_a_ctrl_c_during_a_save_interrupts_the_run_and_is_no_failed_write(tmp_path, process_group, monkeypatch):
    """DCP catches BaseException, and handed a Ctrl-C during the write back as a failed write: the
    run said the disk had failed, with no reason, and with ckpt.on_error=continue trained on. A
    Ctrl-C during a resume's read is no failed read either."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    model, optimizer = trained_pair(0)
    saver = checkpoint.Checkpointer(tmp_path, CkptConfig(on_error="continue"), {})
    saved = saver.save(10, model, optimizer, {"step": 10})
    monkeypatch.setattr(FileSystemWriter, "write_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        saver.save(20, model, optimizer, {"step": 20})
    monkeypatch.setattr(FileSystemReader, "read_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_read.load(saved, model, optimizer)


def test_keep_every_and_async_save(tmp_path, process_group):
    model, optimizer = trained_pair(0)
    saver = checkpoint.Checkpointer(tmp_path, CkptConfig(keep=1, keep_every=20, async_save=True), {})
    for step in (10, 20, 30, 40, 50):
        saver.save(step, model, optimizer, {"step": step})
    # Each save finished the one before; the last is still in flight, completed (renamed) only once
    # the loop finds it written: a synchronous save would have completed it already.
    assert not (tmp_path / "step_50").exists() and (tmp_path / "step_40").is_dir()
    deadline = time.time() + 60
    while not (tmp_path / "step_50").exists():  # the loop polls at log steps, with no next save to come
        assert time.time() < deadline, "step_50 was written but never finished"
        saver.finish_if_written(dist.group.WORLD)
        time.sleep(0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_20", "step_40", "step_50"]
    other, other_optimizer = trained_pair(1)
    assert checkpoint_read.load(tmp_path / "step_50", other, other_optimizer) == {"step": 50}
    torch.testing.assert_close(other.state_dict(), model.state_dict(), rtol=0, atol=0)


class Exploit:
    """Unpickling this runs a shell command: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickles_in_a_checkpoint_are_refused_and_never_run(tmp_path, process_group):
    """torch.distributed.checkpoint unpickles `.metadata` with plain pickle and non-tensor values
    with weights_only=False; vitdist's loading refuses both (resume, export, fine-tune handoff)."""
    model, optimizer = trained_pair(0)
    path = checkpoint.Checkpointer(tmp_path / "ckpt", CkptConfig(keep=0), meta_of(model)).save(
        3, model, optimizer, {"step": 3, "data_positions": {}})
    marker = tmp_path / "pwned"

    # A value of the optimizer's state replaced by the exploit.
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    state["optim"]["state"]["pos_embed"]["step"] = Exploit(marker)
    dcp.save(state, checkpoint_id=tmp_path / "evil_value")
    with pytest.raises(checkpoint_read.UnsafeCheckpoint, match="evil_value'.*refusing to unpickle 'optim.state.pos_embed"):
        checkpoint_read.load(tmp_path / "evil_value", *trained_pair(1))
    assert not marker.exists()

    # The metadata file itself replaced by the exploit.
    for name in ("model.json", "train_state.json"):
        shutil.copy(path / name, tmp_path / "evil_value" / name)
    (tmp_path / "evil_value" / ".metadata").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(checkpoint_read.UnsafeCheckpoint, match="refusing to unpickle posix.system"):
        checkpoint_read.load(tmp_path / "evil_value", *trained_pair(1))
    with pytest.raises(HandoffError, match="refusing to unpickle posix.system"):
        load_pretrained(trained_pair(1)[0], tmp_path / "evil_value")
    with pytest.raises(ConfigError, match="evil_value': .*refusing to unpickle posix.system"):  # train.resume=<it>
        resume.check(cfg := load_config(TINY), tmp_path / "evil_value", [], check_model(cfg.model))
    assert not marker.exists()
    checkpoint_read.load(path, *trained_pair(1))  # the genuine one still loads


def test_a_checkpoint_its_run_deletes_while_it_is_read_is_named_as_deleted(tmp_path, process_group, monkeypatch):
    """`vitdist export` of a run's checkpoints/ while the run trains on: the newest, complete when the
    read began, is deleted before DCP reads it (the run keeps ckpt.keep checkpoints, a newer one
    being complete). Named as deleted, where DCP's AssertionError said its metadata read failed."""
    from vitdist.export import export

    model, optimizer = trained_pair(0)
    path = checkpoint.Checkpointer(tmp_path / "checkpoints", CkptConfig(keep=0), meta_of(model)).save(
        1, model, optimizer, {"step": 1})
    checked = checkpoint_read._SafeReader.read_metadata

    def pruned_after_the_check(reader, *args, **kwargs):
        if calls.append(reader) or len(calls) == 2:  # the first read is the check, the second DCP's load
            shutil.rmtree(path)
        return checked(reader, *args, **kwargs)

    calls = []
    monkeypatch.setattr(checkpoint_read._SafeReader, "read_metadata", pruned_after_the_check)
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint '{path}' was deleted while it was read (by the "
                                                          "run that wrote it, which keeps ckpt.keep checkpoints")):
        export(tmp_path / "checkpoints", tmp_path / "out.safetensors")


def meta_of(model):
    from vitdist.model import model_meta

    cfg = load_config(TINY)
    return model_meta(cfg.model, cfg.data)


@pytest.mark.slow
def test_a_save_that_cannot_be_written_stops_the_run_and_keeps_the_last_checkpoint(demo_shards, tmp_path):
    """A full disk, made by a file-size limit (the write fails with EFBIG where it would with
    ENOSPC): every rank stops with the path and the reason, the partial directory is gone and the
    previous checkpoint is intact; with ckpt.on_error=continue training goes on to the end."""
    common = [*shard_overrides(demo_shards), "data.val_shards=null", f"run.dir={tmp_path}", "ckpt.every_steps=4",
              "log.every_steps=1", "train.global_batch_size=32", "data.micro_batch_size=16"]
    first = run_pretrain(0, [*common, "train.steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    step_4 = tmp_path / "checkpoints" / "step_4"
    limit = max(f.stat().st_size for f in step_4.iterdir()) // 2

    def full_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    stopped = run_pretrain(2, [*common, "train.steps=12"], preexec_fn=full_disk)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    failure = f"error: checkpoint at step 8 could not be written to '{tmp_path / 'checkpoints' / 'step_8.tmp'}' ("
    assert stopped.stderr.count(failure) == 2, stopped.stderr[-3000:]
    size = sum(f.stat().st_size for f in step_4.iterdir()) / 2**30  # beside the free space: is the disk full?
    assert f"the newest complete checkpoint, intact, is '{step_4}' ({size:.3g} GiB)" in stopped.stderr
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_4"]
    checkpoint_read.load_model_weights(step_4)
    assert max(step for step, _ in read_scalars(tmp_path / "tb")["train/loss"]) == 8  # stopped at the failed save

    went_on = run_pretrain(0, [*common, "train.steps=12", "ckpt.on_error=continue"], preexec_fn=full_disk)
    assert "could not be written to" in went_on.stderr and "training goes on (ckpt.on_error=continue)" in went_on.stderr
    assert went_on.returncode == 1 and "error: checkpoint at step 12 could not be written" in went_on.stderr
    assert max(step for step, _ in read_scalars(tmp_path / "tb")["train/loss"]) == 12
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_4"]


def test_a_checkpoint_directory_that_cannot_be_made_fails_the_save_as_any_other(tmp_path, process_group, caplog):
    """`checkpoints` a link to scratch space that is gone (or a disk too full, or a quota too small,
    for its directory): the save fails with the message that names the path, and
    ckpt.on_error=continue trains on, rather than a traceback from asking that missing directory
    how much space it has."""
    model, optimizer = trained_pair(0)
    root = tmp_path / "run" / "checkpoints"
    root.parent.mkdir()
    root.symlink_to(tmp_path / "purged_scratch" / "checkpoints")
    saver = checkpoint.Checkpointer(root, CkptConfig(on_error="continue"), {})
    saver.save(4, model, optimizer, {"step": 4})
    assert f"checkpoint at step 4 could not be written to '{root / 'step_4.tmp'}' (" in caplog.text
    assert "there is no complete checkpoint; training goes on (ckpt.on_error=continue)" in caplog.text
    with pytest.raises(checkpoint.SaveFailed, match=f"checkpoint at step 8 could not be written to '{root}/step_8.tmp'"):
        saver.save(8, model, optimizer, {"step": 8}, final=True)


SAVE_ONE = """
import sys, torch, torch.distributed as dist
from vitdist import checkpoint, checkpoint_read
from vitdist.config import CkptConfig
dist.init_process_group("gloo", store=dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True), rank=0, world_size=1)
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.AdamW(model.parameters())
checkpoint.Checkpointer(sys.argv[1], CkptConfig(), {"arch": "x"}).save(1, model, optimizer, {"step": 1})
dist.destroy_process_group()
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to watch the save's system calls")
def test_a_checkpoint_is_on_disk_before_the_rename_that_makes_it_complete(tmp_path):
    """After a power loss, a `step_N` directory must not hold files (or lack names) that the disk
    had not stored yet: resume would pick it. Watched in the save's own system calls: the JSON
    files and the directory's entries are fsynced before the rename, the rename itself after it."""
    log, root = tmp_path / "strace.log", tmp_path / "ckpt"
    done = subprocess.run(["strace", "-f", "-qq", "--seccomp-bpf", "-o", str(log), "-e", "trace=openat,fsync,rename,renameat,renameat2",
                           sys.executable, "-c", SAVE_ONE, str(root)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    opened, synced, renamed = {}, [], None  # fd -> path per process; paths fsynced before the rename
    for line in log.read_text().splitlines():
        pid, call = line.split(None, 1)  # strace pads the pid column
        if m := re.match(r'openat\(AT_FDCWD, "([^"]+)", .*\) = (\d+)$', call):
            opened[pid, m.group(2)] = Path(m.group(1))
        elif m := re.match(r"fsync\((\d+)\) += 0$", call):
            synced.append((renamed is not None, opened[pid, m.group(1)]))
        elif re.match(r'rename(at2?)?\(.*"[^"]*step_1\.tmp", .*"[^"]*step_1"', call):
            renamed = True
    partial = root / "step_1.tmp"
    assert renamed, "no rename of step_1.tmp to step_1 seen"
    before = {path for after, path in synced if not after}
    assert {partial / "train_state.json", partial / "model.json", partial} <= before, sorted(before)
    assert (True, root) in synced, synced
    assert checkpoint.read_json(root / "step_1", "train_state.json") == {"step": 1}


SAVE_TWO_KEEP_ONE = """
import sys, torch, torch.distributed as dist
from vitdist import checkpoint, checkpoint_read
from vitdist.config import CkptConfig
dist.init_process_group("gloo", store=dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True), rank=0, world_size=1)
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.AdamW(model.parameters())
saver = checkpoint.Checkpointer(sys.argv[1], CkptConfig(keep=1), {"arch": "x"})
for step in (1, 2):
    saver.save(step, model, optimizer, {"step": step})
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to slow the deletion down")
def test_a_kill_while_an_old_checkpoint_is_pruned_leaves_no_step_n_short_of_files(tmp_path):
    """Deleting a checkpoint's files takes long on a parallel filesystem (here each deletion is made
    to take 1 s): killed meanwhile, the run must not leave a `step_N` that lacks some of them."""
    root = tmp_path / "ckpt"
    process = subprocess.Popen(["strace", "-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-e", "trace=unlinkat",
                                "-e", "inject=unlinkat:delay_enter=1000000", sys.executable, "-c", SAVE_TWO_KEEP_ONE,
                                str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # a tracee outlives a killed strace: kill the group
    try:
        deadline = time.time() + 120
        while not (root / "step_2").is_dir():
            assert process.poll() is None and time.time() < deadline, process.stderr.read() if process.poll() else ""
            time.sleep(0.02)
        time.sleep(1.5)  # step_1 being pruned, a file or two gone
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for _, path in checkpoint.complete_checkpoints(root):
        checkpoint_read.check_files(path)
    assert checkpoint.newest_checkpoint(root) == root / "step_2"


def test_a_checkpoint_whose_data_does_not_load_is_named_and_not_retried(demo_shards, tmp_path):
    """A tensor file of full length whose bytes are not what was saved (zeroed by a crash, garbled
    by a disk or a copy) passes the length checks; its load failed in torch.distributed.checkpoint
    with a traceback naming no file and saying to load it again with weights_only=False. The resume
    (exit 1: retried by torchrun and SLURM, to meet it again), `vitdist export` and the fine-tune
    handoff each name the checkpoint and the file; the resume stops as unretriable (exit 2, FATAL)."""
    from conftest import vitdist_cli

    run = [*shard_overrides(demo_shards), f"run.dir={tmp_path / 'run'}", "train.global_batch_size=64",
           "data.micro_batch_size=32", "train.eval_every_steps=0", "data.val_shards=null"]
    first = run_pretrain(0, [*run, "train.steps=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    step = tmp_path / "run" / "checkpoints" / "step_2"
    data = next(step.glob("*.distcp"))
    data.write_bytes(bytes(data.stat().st_size))
    message = (f"checkpoint '{step}' is corrupt: its file '{data.name}' holds data that does not load "
               "(UnpicklingError); restore it, or move the checkpoint out of")
    resumed = run_pretrain(0, [*run, "train.steps=4"])
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert message in resumed.stderr and (tmp_path / "run" / "FATAL").read_text().startswith(message)
    export = vitdist_cli("export", "--checkpoint", step, "--out", tmp_path / "vit.safetensors")
    assert export.returncode == 2 and f"vitdist export: {message}" in export.stderr, export.stderr[-3000:]
    with pytest.raises(HandoffError, match=re.escape(message)):
        load_pretrained(build_model(load_config(TINY).model), step)
