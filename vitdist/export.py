"""A checkpoint (any world size, DDP or FSDP) -> one safetensors file that timm loads strictly,
with a JSON beside it: the arch name and kwargs for `timm.create_model`, image size, classes,
normalisation. Needs no process group and reads only the model's tensors."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from .checkpoint import load_model_weights, newest_if_run
from .config import DataConfig


def export(checkpoint_dir: str | Path, out: str | Path) -> Path:
    """A checkpoint directory, or a run's checkpoints/ (its newest complete one, as for fine-tuning
    and evaluation), into `out`."""
    checkpoint_dir = newest_if_run(Path(checkpoint_dir))
    weights, meta = load_model_weights(checkpoint_dir)
    return write_safetensors(weights, {**meta, "source": str(checkpoint_dir)}, out)


def write_safetensors(weights: dict, meta: dict, out: str | Path) -> Path:
    """`out` (safetensors) and `out` with .json: the arch, timm kwargs, image size, classes, normalisation,
    and the pretrained_cfg that timm's own loading and data config need."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out), metadata={"arch": meta["arch"]})
    size, classes = meta["timm_kwargs"]["img_size"], meta["timm_kwargs"]["num_classes"]
    # For timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(pretrained_cfg, file=out)):
    # left to the arch's own pretrained_cfg, timm drops the head (its num_classes, 1000, differs) and
    # resolve_model_data_config gives the arch's normalisation, size and crop, not this run's.
    pretrained_cfg = {"num_classes": classes, "input_size": [3, size, size], "mean": meta["mean"], "std": meta["std"],
                      "crop_pct": meta.get("val_crop_frac", DataConfig.val_crop_frac), "crop_mode": "center",
                      "interpolation": "bicubic"}
    info = {**meta, "img_size": size, "num_classes": classes, "pretrained_cfg": pretrained_cfg}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return out
