"""Checkpoints with torch.distributed.checkpoint: `<dir>/step_<N>/`, each rank writing its part.

A save goes to `step_<N>.tmp/` and is renamed by rank 0 only after every rank has finished,
so a directory named `step_<N>` is always complete and a killed save is never resumed from.
Beside the tensors, `train_state.json` holds the loop's and the data streams' positions.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

_COMPLETE = re.compile(r"^step_(\d+)$")
_PARTIAL = re.compile(r"^step_(\d+)\.tmp$")
TRAIN_STATE = "train_state.json"


def _steps(root: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = ((pattern.match(p.name), p) for p in root.iterdir() if p.is_dir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    return _steps(Path(root), _COMPLETE)


def resume_path(spec: str, root: str | Path) -> Path | None:
    """`train.resume`: 'auto' is the newest complete checkpoint under root (or none), 'none' is
    a fresh start, anything else a checkpoint directory that must exist."""
    if spec == "none":
        return None
    if spec == "auto":
        found = complete_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(spec)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"train.resume='{spec}' is not a complete checkpoint directory (no .metadata)")
    return path


def save(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         train_state: dict, keep: int) -> Path:
    root = Path(root)
    final, partial = root / f"step_{step}", root / f"step_{step}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
    dist.barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=partial)
    if dist.get_rank() == 0:
        (partial / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    complete = complete_checkpoints(root)
    if keep > 0:
        for _, path in complete[:-keep]:
            shutil.rmtree(path)
    newest = complete[-1][0] if complete else -1
    for step, path in _steps(root, _PARTIAL):
        if step < newest:
            shutil.rmtree(path)


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load model and optimizer in place (any world size); return the train state."""
    path = Path(path)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return json.loads((path / TRAIN_STATE).read_text())
