"""A checkpoint (any world size, DDP or FSDP) -> one safetensors file that timm loads strictly,
with a JSON beside it: the arch name and kwargs for `timm.create_model`, image size, classes,
normalisation. Needs no process group and reads only the model's tensors."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from .checkpoint import load_model_weights


def export(checkpoint_dir: str | Path, out: str | Path) -> Path:
    weights, meta = load_model_weights(checkpoint_dir)
    return write_safetensors(weights, {**meta, "source": str(checkpoint_dir)}, out)


def write_safetensors(weights: dict, meta: dict, out: str | Path) -> Path:
    """`out` (safetensors) and `out` with .json: the arch, timm kwargs, image size, classes, normalisation."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out), metadata={"arch": meta["arch"]})
    info = {**meta, "img_size": meta["timm_kwargs"]["img_size"], "num_classes": meta["timm_kwargs"]["num_classes"]}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return out
