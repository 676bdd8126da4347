"""A checkpoint (any world size, DDP or FSDP) -> one safetensors file that timm loads strictly,
with a JSON beside it: the arch name and kwargs for `timm.create_model`, image size, classes,
normalisation. Needs no process group and reads only the model's tensors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import timm
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from .checkpoint import MODEL_META


def export(checkpoint_dir: str | Path, out: str | Path) -> Path:
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    meta_path = checkpoint_dir / MODEL_META
    if not (checkpoint_dir / ".metadata").is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"'{checkpoint_dir}' is not a complete vitdist checkpoint (no .metadata or {MODEL_META})")
    meta = json.loads(meta_path.read_text())
    model = timm.create_model(meta["arch"], pretrained=False, **meta["timm_kwargs"])
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=checkpoint_dir, no_dist=True)
    return write_safetensors(state["model"], {**meta, "source": str(checkpoint_dir)}, out)


def write_safetensors(weights: dict, meta: dict, out: str | Path) -> Path:
    """`out` (safetensors) and `out` with .json: the arch, timm kwargs, image size, classes, normalisation."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out), metadata={"arch": meta["arch"]})
    info = {**meta, "img_size": meta["timm_kwargs"]["img_size"], "num_classes": meta["timm_kwargs"]["num_classes"]}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return out
