"""Checkpoints with torch.distributed.checkpoint: `<dir>/step_<N>/`, each rank writing its shard.

A save goes to `step_<N>.tmp/` and is renamed by rank 0 only after every rank has finished,
so a directory named `step_<N>` is always complete and a killed save is never resumed from.
Beside the tensors: `train_state.json` (loop and data-stream positions) and `model.json` (what
timm needs to rebuild the model). The state dicts (the model's, the optimizer's, and the average of
the weights where the run keeps one) are keyed by parameter name, not by rank, so
a checkpoint loads on any number of processes, under DDP or FSDP.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from . import distributed
from .config import CkptConfig
from .ema import WeightAverage

_COMPLETE = re.compile(r"^step_(\d+)$")
_PARTIAL = re.compile(r"^step_(\d+)\.tmp$")
TRAIN_STATE, MODEL_META = "train_state.json", "model.json"
AVERAGE = "ema"  # the state dict's key of the average of the weights, where the run keeps one

log = logging.getLogger(__name__)


def _steps(root: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = ((pattern.match(p.name), p) for p in root.iterdir() if p.is_dir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    return _steps(Path(root), _COMPLETE)


def newest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def _partial_dir(root: Path, step: int) -> Path:
    """Where step `step`'s save is written, and an old checkpoint is moved to be deleted."""
    return root / f"step_{step}.tmp"


def unfinished_saves(root: str | Path) -> list[Path]:
    """The partial saves newer than the newest complete checkpoint under `root`: what a resume
    passes over (an older one is what prune deletes)."""
    newest = (complete_checkpoints(root) or [(-1, None)])[-1][0]
    return [path for step, path in _steps(Path(root), _PARTIAL) if step > newest]


def newest_if_run(path: Path) -> Path:
    """A run's checkpoints directory stands for its newest complete checkpoint (what SLURM chains
    pass on); any other path for itself."""
    return path if (path / ".metadata").exists() else newest_checkpoint(path) or path


def read_json(checkpoint: Path, name: str) -> dict:
    """The checkpoint's TRAIN_STATE or MODEL_META (FileNotFoundError naming it if unreadable)."""
    try:
        return json.loads((checkpoint / name).read_text())
    except (OSError, ValueError) as e:  # ValueError: cut short, or not text
        raise FileNotFoundError(incomplete(checkpoint, name, f"cannot be read ({e})")) from None


def failures(error: CheckpointException) -> dict[int, BaseException]:
    """What each failing rank raised in a DCP save or load (torch keeps it with its traceback). DCP
    catches BaseException: a Ctrl-C during either comes back as a failure, which was reported as a
    failed write or read with an empty reason; it is raised here as it came."""
    raised = {rank: failure[0] if isinstance(failure, tuple) else failure for rank, failure in error.failures.items()}
    if interrupt := next((e for e in raised.values() if isinstance(e, KeyboardInterrupt)), None):
        raise interrupt
    return raised


def incomplete(checkpoint: Path, name: str, why: str) -> str:
    return (f"checkpoint '{checkpoint}' is incomplete: its file '{name}' {why}; restore it, or move the checkpoint "
            f"out of '{checkpoint.parent}' to resume from the one before")


def _step(checkpoint: Path) -> int:
    return read_json(checkpoint, TRAIN_STATE)["step"]


def resume_path(spec: str, root: str | Path) -> Path | None:
    """`train.resume`: 'auto' is the newest complete checkpoint under root (or none), 'none' is
    a fresh start (FileExistsError where root holds checkpoints), anything else a checkpoint
    directory that must exist (a run's checkpoints directory: its newest), unless the run has checkpointed under root since it resumed from
    there: then its newest. A requeued job's command still names that directory (which `ckpt.keep`
    may have pruned since), and going back to it would lose the progress. A directory that is there
    but not complete (a save that did not finish) is refused: nothing was pruned."""
    newest = newest_checkpoint(root)
    if spec == "none":
        if newest is not None:  # a fresh run's saves would replace its checkpoints, and `ckpt.keep` prune its own
            raise FileExistsError(f"train.resume=none, but '{root}' holds checkpoints of an earlier run (newest "
                                  f"'{newest.name}'): a fresh run there would overwrite and prune them, and mix its "
                                  f"curves into theirs; give a new run.dir, or move the checkpoints away")
        return None
    if spec == "auto":
        return newest
    path = newest_if_run(Path(spec))
    # A save killed after its files were written, before the rename that completes it, has them all.
    unfinished = _PARTIAL.match(path.name) is not None
    named = (path / ".metadata").is_file() and not unfinished
    if not named and (newest is None or path.exists()):
        # A checkpoint of another run, resumed into a new run.dir: the complete one meant is beside it.
        complete = newest_checkpoint(path.parent) or newest
        newest_is = f"; the newest complete checkpoint in '{complete.parent}' is '{complete}'" if complete else ""
        if unfinished:
            why = "a save that did not finish: it is renamed without .tmp once complete"
        elif not path.exists():
            why = "it does not exist"
        elif newest_checkpoint(path / "checkpoints"):  # a run.dir, for its checkpoints
            why = f"no .metadata; a run's checkpoints are in '{path / 'checkpoints'}', which stands for its newest"
        else:
            why = "no .metadata"
        raise FileNotFoundError(f"train.resume='{spec}' is not a complete checkpoint directory ({why}){newest_is}")
    if newest is not None and (not named or _step(newest) > _step(path)):
        return newest
    return path


def passed_over(spec: str, resume_from: Path | None) -> bool:
    """Whether `train.resume` named a checkpoint that resume_path passed over for the run's own newer one."""
    return resume_from is not None and spec not in ("auto", "none") and resume_from != newest_if_run(Path(spec))


def prune(root: Path, keep: int, keep_every: int) -> None:
    """Keep the newest `keep` complete checkpoints and those at multiples of `keep_every`; drop a
    partial one only once a newer complete one exists."""
    complete = complete_checkpoints(root)
    if keep > 0:
        for step, path in complete[:-keep]:
            if not (keep_every and step % keep_every == 0):
                # Renamed a partial first: deleting a checkpoint's files takes long on a parallel
                # filesystem, and a kill meanwhile must not leave a step_N short of some.
                partial = _partial_dir(root, step)
                shutil.rmtree(partial, ignore_errors=True)
                path.rename(partial)
                shutil.rmtree(partial)
    newest = complete[-1][0] if complete else -1
    for step, path in _steps(root, _PARTIAL):
        if step < newest:
            shutil.rmtree(path)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    """Its entries on disk: a file's own fsync does not write the name that finds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    """Free space where `path` is, or would be: a directory that could not be made (a full disk, a
    link to a scratch space that is gone) has no free space of its own to ask for."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free


def gib(size: int) -> str:
    return f"{size / 2**30:.3g} GiB"


class SaveFailed(OSError):
    """A checkpoint that could not be written; the newest complete one is untouched."""


def save_failed(message: str, on_error: str, final: bool = False) -> None:
    """A failed save, as ckpt.on_error says (a final one always stops): SaveFailed, or logged."""
    if final or on_error == "stop":
        raise SaveFailed(message)
    log.error("%s; training goes on (ckpt.on_error=continue)", message)


class Checkpointer:
    """Saves (sync or async) and finalises checkpoints under `root`. Its collectives run on a gloo
    group of its own, so that an async save's background thread never meets another collective.
    A failed save (every rank learns of it together) removes its partial directory, to free the
    space a later save needs, and raises SaveFailed under `ckpt.on_error=stop`; under `continue`
    it is logged and training goes on."""

    def __init__(self, root: str | Path, cfg: CkptConfig, model_meta: dict, timeout_s: float = 600):
        self.root, self.cfg, self.model_meta = Path(root), cfg, model_meta
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))  # else gloo's 30 min
        self._pending: tuple[Future, int, dict] | None = None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict,
             final: bool = False, average: WeightAverage | None = None) -> Path:
        """Returns the directory the checkpoint gets once complete. `final`: the run ends after this
        save, so a failure stops it whatever `ckpt.on_error` says (an async final save is waited for).
        `average`: the average of the weights the run keeps, saved beside them."""
        self.wait()
        partial = _partial_dir(self.root, step)
        try:
            if dist.get_rank() == 0:
                shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
            dist.barrier(group=self.group)
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
            if average is not None:
                state[AVERAGE] = average.average
            if self.cfg.async_save:
                response = dcp.async_save(state, checkpoint_id=partial, process_group=self.group)
                self._pending = (getattr(response, "upload_completion", response), step, train_state)
            else:
                dcp.save(state, checkpoint_id=partial, process_group=self.group)
                self._finalize(step, train_state)
        except (OSError, CheckpointException) as e:
            self._failed(step, e, final)
        if final:
            self.wait(final=True)
        return self.root / f"step_{step}"

    def wait(self, final: bool = False) -> None:
        """Finish the async save in flight, if any (before the next save, and before exit)."""
        if self._pending is not None:
            future, step, train_state = self._pending
            self._pending = None
            try:
                future.result()
                self._finalize(step, train_state)
            except (OSError, CheckpointException) as e:
                self._failed(step, e, final)

    def finish_if_written(self, group: dist.ProcessGroup) -> None:
        """Finish the async save in flight once every rank has written its part, rather than at the
        next save: until then a killed job resumes from the checkpoint before it. `group` is not
        the save's own, on which its background thread may still run collectives."""
        if self._pending is None:
            return
        written = torch.tensor([int(self._pending[0].done())])
        dist.all_reduce(written, op=dist.ReduceOp.MIN, group=group)
        if written.item():
            self.wait()

    def newest(self) -> Path | None:
        return newest_checkpoint(self.root)

    def _finalize(self, step: int, train_state: dict) -> None:
        dist.barrier(group=self.group)  # every rank has written its part
        partial, final = _partial_dir(self.root, step), self.root / f"step_{step}"

        def complete() -> None:
            # On disk before the name that makes the checkpoint complete: after a power loss a
            # renamed directory could otherwise hold empty files, and resume would pick it.
            _write_synced(partial / TRAIN_STATE, json.dumps(train_state, indent=1))
            _write_synced(partial / MODEL_META, json.dumps(self.model_meta, indent=1))
            _sync_dir(partial)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            _sync_dir(self.root)

        error = distributed.on_rank_zero(complete, self.group, expected=(OSError,))
        if error is not None:
            raise error
        if dist.get_rank() == 0:
            try:  # the checkpoint is complete: failing to drop older ones is no failed save
                prune(self.root, self.cfg.keep, self.cfg.keep_every)
            except OSError as e:
                log.warning("step %d saved, but older checkpoints could not be pruned: %s", step, e)

    def _failed(self, step: int, error: Exception, final: bool) -> None:
        partial = _partial_dir(self.root, step)
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, CheckpointException):  # the first failing rank's own exception
            rank, failure = next(iter(failures(error).items()))
            error = f"{failure} (rank {rank})"
        newest = self.newest()
        # Its size beside the free space tells a full disk, which torch may report only as "unexpected pos".
        kept = (f"the newest complete checkpoint, intact, is '{newest}' ({gib(sum(f.stat().st_size for f in newest.iterdir()))})"
                if newest else "there is no complete checkpoint")
        message = (f"checkpoint at step {step} could not be written to '{partial}' ({gib(free_bytes(self.root))} free "
                   f"there): {error}; {kept}")
        save_failed(message, self.cfg.on_error, final)
