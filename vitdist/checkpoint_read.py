"""Reading checkpoints back, safely: every file `.metadata` names checked there and whole before a
load starts, nothing unpickled but DCP's metadata classes, tensors and plain values (a crafted file
cannot run code), and a file whose data does not load named. For resumes (`load`), and for
exports, fine-tuning and evaluation, which read the model's weights in one process."""

from __future__ import annotations

import dataclasses
import io
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from .checkpoint import AVERAGE, MODEL_META, TRAIN_STATE, failures, incomplete, read_json
from .ema import WeightAverage


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
    except (Exception, CheckpointException) as e:  # not an Exception: a BaseException
        if _deleted_since_checked(path):  # DCP's own error says a read failed, not why
            raise FileNotFoundError(f"checkpoint '{path}' was deleted while it was read (by the run that wrote it, "
                                    "which keeps ckpt.keep checkpoints, once a newer one is complete?): read the "
                                    "newest again") from None
        if isinstance(e, UnsafeCheckpoint):
            raise UnsafeCheckpoint(f"'{path}': {e}") from None
        if not isinstance(e, CheckpointException):
            raise
        raised = failures(e).values()  # what the readers raised, per rank, some of it as text only
        refusals = [line for exc in raised for line in str(exc).split("; ") if _REFUSAL in line]
        if refusals:
            raise UnsafeCheckpoint(f"'{path}': {refusals[0][refusals[0].index(_REFUSAL):]}") from None
        if corrupt := [exc for exc in raised if isinstance(exc, CorruptCheckpoint)]:
            raise CorruptCheckpoint(f"checkpoint '{path}' is corrupt: {corrupt[0]}; restore it, or move the checkpoint "
                                    f"out of '{path.parent}' to resume from the one before") from None
        raise


def _deleted_since_checked(path: Path) -> bool:
    """Whether a file of the checkpoint `path`, which was complete when the load began (every caller
    checks it first: _complete_metadata), is gone: a run deletes its older checkpoints."""
    try:
        _complete_metadata(path)
    except FileNotFoundError:
        return True
    return False


def _complete_metadata(path: Path) -> Metadata:
    """`path`'s `.metadata`, unpickled safely (UnsafeCheckpoint naming the path), once every file it
    names is there and long enough (else FileNotFoundError naming the file): one rank's file lost, a
    checkpoint copied in part, or one written before a crash that lost what the disk had not yet
    stored, is refused before any load starts."""
    try:
        metadata = _SafeReader(path).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise FileNotFoundError(incomplete(path, ".metadata", f"cannot be read ({str(e) or 'cut short'})")) from None
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(f"'{path}': {e}") from None
    needed: dict[str, int] = {}  # file -> bytes
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        have = (path / name).stat().st_size if (path / name).is_file() else None
        if have is None or have < size:
            raise FileNotFoundError(incomplete(path, name, "is missing" if have is None else
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


class NoAverage(ValueError):
    """`--ema` asked of a checkpoint whose run kept no average of the weights."""


def _no_average(path: Path) -> NoAverage:
    return NoAverage(f"checkpoint '{path}' holds no average of the weights: the run that wrote it had train.ema_decay=0")


def _averaged(metadata: Metadata) -> set[str]:
    """The parameters whose average the checkpoint holds: none where its run kept no average; its
    trained ones otherwise (a frozen parameter is its own average)."""
    prefix = f"{AVERAGE}."
    return {fqn.removeprefix(prefix) for fqn in metadata.state_dict_metadata if fqn.startswith(prefix)}


def load_model_weights(path: str | Path, average: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole model's weights (timm's keys) and its `model.json`, read in this process alone,
    with no process group: for exports, fine-tuning and evaluation. `average`: the parameters are
    those of the average the run kept (train.ema_decay; NoAverage where it kept none)."""
    path = Path(path)
    meta = _model_json(path)
    metadata = _checked_metadata(path, average)
    # Read into tensors shaped as `.metadata` records them, not into a model built for them: building
    # ViT-L on the CPU, its random init included, took 27 s beside the model its caller builds anyway.
    weights = _weights(metadata, average, "cpu")
    state = {"model": weights}
    if average:
        # Buffers, and the parameters a run kept frozen, are the weights'.
        averaged = _averaged(metadata)
        state = {AVERAGE: {k: v for k, v in weights.items() if k in averaged},
                 "model": {k: v for k, v in weights.items() if k not in averaged}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _safe_load(state, path, no_dist=True)
    return weights, meta


def model_weight_shapes(path: str | Path, average: bool = False) -> dict[str, torch.Tensor]:
    """What load_model_weights gives, as tensors on the meta device: names, shapes and dtypes from
    `.metadata`, no tensor data read (a check before the load, which reads GBs for ViT-g); the
    files that hold the data are only looked at, as check_files does."""
    path = Path(path)
    _model_json(path)  # refused as load_model_weights refuses it
    return _weights(_checked_metadata(path, average), average, "meta")


def _checked_metadata(path: Path, average: bool) -> Metadata:
    """`.metadata`, every file it names there and long enough (a lost or short file named, not met
    as DCP's traceback mid-load), and an average there if `average` (else NoAverage)."""
    metadata = _complete_metadata(path)
    if average and not _averaged(metadata):
        raise _no_average(path)
    return metadata


def _weights(metadata: Metadata, average: bool, device: str) -> dict[str, torch.Tensor]:
    """Empty tensors for the model's weights as `.metadata` records them; the average's parameters in
    place of the weights' where `average` (buffers and frozen parameters are the weights')."""
    def tensors(prefix: str) -> dict[str, torch.Tensor]:
        return {fqn.removeprefix(prefix): torch.empty(item.size, dtype=item.properties.dtype, device=device)
                for fqn, item in metadata.state_dict_metadata.items()
                if fqn.startswith(prefix) and isinstance(item, TensorStorageMetadata)}
    return {**tensors("model."), **(tensors(f"{AVERAGE}.") if average else {})}


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


def load_average(path: str | Path, average: WeightAverage) -> bool:
    """The checkpoint's average of the weights into `average`, in place (any world size, DDP or
    FSDP); False, `average` untouched, where the checkpoint holds none."""
    path = Path(path)
    if not _averaged(_complete_metadata(path)):
        return False
    _safe_load({AVERAGE: average.average}, path)
    return True
