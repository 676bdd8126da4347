"""A checkpoint (any world size, DDP or FSDP) -> one safetensors file that timm loads strictly,
with a JSON beside it: the arch name and kwargs for `timm.create_model`, image size, classes,
normalisation. Needs no process group and reads only the model's tensors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import newest_if_run
from .checkpoint_read import load_model_weights
from .config import DataConfig
from .files import written_whole


def export(checkpoint_dir: str | Path, out: str | Path, average: bool = False) -> Path:
    """A checkpoint directory, or a run's checkpoints/ (its newest complete one, as for fine-tuning
    and evaluation), into `out`, whose name must end in .safetensors: timm and vitdist read a file
    as safetensors by its name, and as a pickle otherwise (ValueError). `average`: the average of
    the weights the run kept (train.ema_decay), not the weights."""
    if Path(out).suffix != ".safetensors":
        raise ValueError(f"--out '{out}' must end in .safetensors: timm and vitdist tell a safetensors file by its "
                         "name, and would read it as a pickled state dict")
    checkpoint_dir = newest_if_run(Path(checkpoint_dir))
    weights, meta = load_model_weights(checkpoint_dir, average)
    return write_safetensors(weights, {**meta, "source": str(checkpoint_dir), "ema": average}, out)


def write_safetensors(weights: dict, meta: dict, out: str | Path) -> Path:
    """`out` (safetensors) and `out` with .json: the arch, timm kwargs, image size, classes, normalisation,
    and the pretrained_cfg that timm's own loading, data config and output names need. A `step`, `val_top1` and
    `val_loss` in `meta` (best.safetensors) go into the safetensors metadata too. Both files are written beside,
    then renamed: a kill or a failed write leaves the previous pair whole."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size, num_classes = meta["timm_kwargs"]["img_size"], meta["timm_kwargs"]["num_classes"]
    # For timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(pretrained_cfg, file=out)):
    # left to the arch's own pretrained_cfg, timm drops the head (its num_classes, 1000, differs) and
    # resolve_model_data_config gives the arch's normalisation, size and crop, not this run's.
    pretrained_cfg = {"num_classes": num_classes, "input_size": [3, size, size], "mean": meta["mean"],
                      "std": meta["std"], "crop_pct": meta.get("val_crop_frac", DataConfig.val_crop_frac),
                      "crop_mode": "center", "interpolation": "bicubic"}
    if "classes" in meta:
        # What timm's tools and the Hugging Face hub name the outputs by (save_for_hf passes them on);
        # without them, a 1000-class head is taken for ImageNet-1k's and named by its classes. Names
        # past the head's outputs are those of labels the run skipped as out of range; outputs past the
        # names (model.num_classes above the classes) go unnamed in timm's form for that, {index: name}:
        # a list shorter than the outputs fails the tools that look an output up in it.
        names = meta["classes"][:num_classes]
        pretrained_cfg["label_names"] = names if len(names) == num_classes else {str(i): n for i, n in enumerate(names)}
    info = {**meta, "img_size": size, "num_classes": num_classes, "pretrained_cfg": pretrained_cfg}
    header = {"arch": meta["arch"], **{key: str(meta[key]) for key in ("step", "val_top1", "val_loss") if key in meta}}
    # Both written before either is renamed: a full disk that fails the small JSON after the weights
    # would leave new weights beside the old JSON, and a best.safetensors whose scores were not kept.
    # safetensors writes a temporary file of its own beside the one named, then renames it: in a
    # directory of its own, which the next write empties, a kill there leaves no model-sized file for good.
    scratch = out.with_name(f".{out.name}.writing")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(scratch / out.name), metadata=header)
        with written_whole(out.with_suffix(".json")) as partial_json:
            partial_json.write_text(json.dumps(info, indent=1))
        shutil.copymode(out.with_suffix(".json"), scratch / out.name)  # the umask's, where safetensors' is 0600
        os.replace(scratch / out.name, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def recorded_best(path: Path) -> dict | None:
    """The `val_top1` and `val_loss` a best.safetensors records (no val_loss where it was written
    before vitdist recorded it); None where it records no val_top1 or there is no such file."""
    recorded = header(path) if path.is_file() else {}
    if "val_top1" not in recorded:
        return None
    return {key: float(recorded[key]) for key in ("val_top1", "val_loss") if key in recorded}


def header(path: Path) -> dict[str, str]:
    """The metadata a safetensors file carries (what write_safetensors puts there: arch, step, val_top1, val_loss)."""
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}
