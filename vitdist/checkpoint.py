"""Checkpoints with torch.distributed.checkpoint: `<dir>/step_<N>/`, each rank writing its shard.

A save goes to `step_<N>.tmp/` and is renamed by rank 0 only after every rank has finished,
so a directory named `step_<N>` is always complete and a killed save is never resumed from.
Beside the tensors: `train_state.json` (loop and data-stream positions) and `model.json` (what
timm needs to rebuild the model). The state dicts are keyed by parameter name, not by rank, so
a checkpoint loads on any number of processes, under DDP or FSDP.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import re
import shutil
import warnings
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from .config import CkptConfig

_COMPLETE = re.compile(r"^step_(\d+)$")
_PARTIAL = re.compile(r"^step_(\d+)\.tmp$")
TRAIN_STATE, MODEL_META = "train_state.json", "model.json"

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
        raise FileNotFoundError(_incomplete(checkpoint, name, f"cannot be read ({e})")) from None


def _incomplete(checkpoint: Path, name: str, why: str) -> str:
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
    named = (path / ".metadata").is_file()
    if not named and (newest is None or path.exists()):
        newest_is = f"; the newest complete checkpoint in '{root}' is '{newest}'" if newest else ""
        raise FileNotFoundError(f"train.resume='{spec}' is not a complete checkpoint directory (no .metadata){newest_is}")
    if newest is not None and (not named or _step(newest) > _step(path)):
        return newest
    return path


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


def _free_bytes(path: Path) -> int:
    """Free space where `path` is, or would be: a directory that could not be made (a full disk, a
    link to a scratch space that is gone) has no free space of its own to ask for."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free


def _gib(size: int) -> str:
    return f"{size / 2**30:.3g} GiB"


class SaveFailed(OSError):
    """A checkpoint that could not be written; the newest complete one is untouched."""


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
             final: bool = False) -> Path:
        """Returns the directory the checkpoint gets once complete. `final`: the run ends after this
        save, so a failure stops it whatever `ckpt.on_error` says (an async final save is waited for)."""
        self.wait()
        partial = _partial_dir(self.root, step)
        try:
            if dist.get_rank() == 0:
                shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
            dist.barrier(group=self.group)
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
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
        error = [None]
        if dist.get_rank() == 0:
            partial, final = _partial_dir(self.root, step), self.root / f"step_{step}"
            try:
                # On disk before the name that makes the checkpoint complete: after a power loss a
                # renamed directory could otherwise hold empty files, and resume would pick it.
                _write_synced(partial / TRAIN_STATE, json.dumps(train_state, indent=1))
                _write_synced(partial / MODEL_META, json.dumps(self.model_meta, indent=1))
                _sync_dir(partial)
                shutil.rmtree(final, ignore_errors=True)
                partial.rename(final)
                _sync_dir(self.root)
            except OSError as e:
                error = [e]
        dist.broadcast_object_list(error, src=0, group=self.group)
        if error[0] is not None:
            raise error[0]
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
            rank, failure = next(iter(error.failures.items()))
            error = f"{failure[0] if isinstance(failure, tuple) else failure} (rank {rank})"
        newest = self.newest()
        # Its size beside the free space tells a full disk, which torch may report only as "unexpected pos".
        kept = (f"the newest complete checkpoint, intact, is '{newest}' ({_gib(sum(f.stat().st_size for f in newest.iterdir()))})"
                if newest else "there is no complete checkpoint")
        message = (f"checkpoint at step {step} could not be written to '{partial}' ({_gib(_free_bytes(self.root))} free "
                   f"there): {error}; {kept}")
        if final or self.cfg.on_error == "stop":
            raise SaveFailed(message)
        log.error("%s; training goes on (ckpt.on_error=continue)", message)


class UnsafeCheckpoint(ValueError):
    """A checkpoint that holds objects other than DCP's metadata, tensors and plain values."""


# What DCP's `.metadata` pickle names, and nothing else: a crafted one cannot call anything.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath"},
    "collections": {"OrderedDict"},
}


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files are all there and long enough, yet hold data that does not load
    (zeroed by a crash, garbled by a bad disk or copy): every retry would meet it again."""


_REFUSAL = "refusing to unpickle"


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"{_REFUSAL} {module}.{name}: checkpoint metadata names DCP's own classes only")


class _SafeReader(dcp.FileSystemReader):
    """torch's reader unpickles `.metadata` with plain pickle: any code a crafted file names runs."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner) -> torch.futures.Future:
        """torch's, one file at a time, so that a file whose data does not load is named (torch's own
        error names none, and says to load it again unsafely, with weights_only=False)."""
        files: dict[str, list] = {}
        for item in plan.items:
            files.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in files.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except UnsafeCheckpoint:
                raise
            except Exception as e:
                raise CorruptCheckpoint(f"its file '{name}' holds data that does not load ({type(e).__name__})") from None
        done = torch.futures.Future()
        done.set_result(None)
        return done


class _SafePlanner(DefaultLoadPlanner):
    """Non-tensor values (optimizer hyperparameters) come back through torch.load: weights_only, so
    a crafted value cannot run code (torch's planner loads them with weights_only=False)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            why = next((line for line in str(e).splitlines() if "Unsupported global" in line), "not plain data")
            raise UnsafeCheckpoint(f"{_REFUSAL} '{fqn}': {why.strip()}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def _safe_load(state: dict, path: Path, **kwargs) -> None:
    """dcp.load that never unpickles arbitrary objects; UnsafeCheckpoint names the path."""
    try:
        dcp.load(state, storage_reader=_SafeReader(path), planner=_SafePlanner(), **kwargs)
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(f"'{path}': {e}") from None
    except CheckpointException as e:  # what the readers raised, per rank, some of it as text only
        refusals = [line for exc, _ in e.failures.values() for line in str(exc).split("; ") if _REFUSAL in line]
        if refusals:
            raise UnsafeCheckpoint(f"'{path}': {refusals[0][refusals[0].index(_REFUSAL):]}") from None
        if corrupt := [exc for exc, _ in e.failures.values() if isinstance(exc, CorruptCheckpoint)]:
            raise CorruptCheckpoint(f"checkpoint '{path}' is corrupt: {corrupt[0]}; restore it, or move the checkpoint "
                                    f"out of '{path.parent}' to resume from the one before") from None
        raise


def _complete_metadata(path: Path) -> Metadata:
    """`path`'s `.metadata`, unpickled safely (UnsafeCheckpoint naming the path), once every file it
    names is there and long enough (else FileNotFoundError naming the file): one rank's file lost, a
    checkpoint copied in part, or one written before a crash that lost what the disk had not yet
    stored, is refused before any load starts."""
    try:
        metadata = _SafeReader(path).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise FileNotFoundError(_incomplete(path, ".metadata", f"cannot be read ({str(e) or 'cut short'})")) from None
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(f"'{path}': {e}") from None
    needed: dict[str, int] = {}  # file -> bytes
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        have = (path / name).stat().st_size if (path / name).is_file() else None
        if have is None or have < size:
            raise FileNotFoundError(_incomplete(path, name, "is missing" if have is None else
                                                f"has {have} of its {size} bytes"))
    return metadata


def check_files(path: Path) -> None:
    """`.metadata` and the JSON files read, and every file `.metadata` names there and long enough
    (FileNotFoundError naming the file)."""
    _complete_metadata(path)
    for name in (TRAIN_STATE, MODEL_META):
        read_json(path, name)


def _model_json(path: Path) -> dict:
    """The `model.json` of the complete checkpoint `path` (FileNotFoundError saying what it lacks)."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if not (path / ".metadata").is_file() or not (path / MODEL_META).is_file():
        raise FileNotFoundError(f"'{path}' is not a complete vitdist checkpoint (no .metadata or {MODEL_META})")
    return read_json(path, MODEL_META)


def load_model_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole model's weights (timm's keys) and its `model.json`, read in this process alone,
    with no process group: for exports, fine-tuning and evaluation."""
    path = Path(path)
    meta = _model_json(path)
    _complete_metadata(path)  # a lost or short file named (FileNotFoundError), not DCP's traceback mid-load
    state = {"model": timm.create_model(meta["arch"], pretrained=False, **meta["timm_kwargs"]).state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _safe_load(state, path, no_dist=True)
    return state["model"], meta


def model_weight_shapes(path: str | Path) -> dict[str, torch.Tensor]:
    """What load_model_weights gives, as tensors on the meta device: names, shapes and dtypes from
    `.metadata`, no tensor data read (a check before the load, which reads GBs for ViT-g); the
    files that hold the data are only looked at, as check_files does."""
    path = Path(path)
    _model_json(path)  # refused as load_model_weights refuses it
    return {fqn.removeprefix("model."): torch.empty(item.size, dtype=item.properties.dtype, device="meta")
            for fqn, item in _complete_metadata(path).state_dict_metadata.items()
            if fqn.startswith("model.") and isinstance(item, TensorStorageMetadata)}


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load model and optimizer in place (any world size, DDP or FSDP); return the train state.
    The optimizer's state (moments, step counts) comes from the checkpoint; its parameter groups
    and their settings (weight decay, betas, eps, lr scales) stay those it was built with: a
    resume's config changes them, finetune.layer_decay the groups themselves."""
    path = Path(path)
    optim = get_optimizer_state_dict(model, optimizer)
    state = {"model": get_model_state_dict(model), "optim": {"state": optim["state"]}}
    _safe_load(state, path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, {"state": state["optim"]["state"], "param_groups": optim["param_groups"]})
    return read_json(path, TRAIN_STATE)
