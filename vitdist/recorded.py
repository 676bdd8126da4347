"""What a checkpoint records of the model its weights belong to and how they were fed: the
architecture and timm's arguments, the normalisation, the validation crop, the class names. A
vitdist checkpoint says it in its model.json, an export in the JSON beside it, a Hugging Face hub
folder in its config.json; a bare state dict says nothing."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import timm

from .checkpoint import MODEL_META
from .config import ConfigError, DataConfig
from .handoff import HUB_CONFIG, HUB_WEIGHTS, locate, recorded_arch

log = logging.getLogger(__name__)


def recorded_meta(checkpoint: Path) -> tuple[dict, str] | None:
    """What `checkpoint` (as `handoff.locate` gives it) records, and the file that says it; None for a
    bare state dict."""
    if (meta := checkpoint / MODEL_META).is_file():
        return json.loads(meta.read_text()), str(meta)
    if (export := _export_meta(checkpoint.with_suffix(".json"))) is not None:
        return export, str(checkpoint.with_suffix(".json"))
    hub = checkpoint.parent / HUB_CONFIG
    if checkpoint.name in HUB_WEIGHTS and hub.is_file():
        return hub_meta(hub), str(hub)
    return None


def _export_meta(path: Path) -> dict | None:
    """The JSON that `vitdist export` writes beside its weights; None where `path` is another file of
    that name (a state dict's training log, notes), which says nothing of the weights."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and {"arch", "timm_kwargs", "mean", "std"} <= meta.keys():
        return meta
    return None


def hub_meta(path: Path) -> dict:
    """The config.json that timm's save_for_hf and push_to_hf_hub write, read as timm reads it
    (timm.models._hub): num_classes and label_names at its top level before its pretrained_cfg's,
    and model_args (the weights' own timm.create_model arguments) to build the model; or, as timm
    before 0.9 wrote it, one flat dict: the pretrained_cfg itself, with the architecture and the
    class names (`labels`) in it. ConfigError, naming the file and the key, where something
    evaluation needs is missing."""
    try:
        hub = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read '{path}': {e}") from None
    flat = "pretrained_cfg" not in hub
    pretrained, prefix = (hub, "") if flat else (hub["pretrained_cfg"], "pretrained_cfg.")
    model_args = hub.get("model_args", {})

    def needed(key: str, value):
        if value is None:
            raise ConfigError(f"'{path}' has no {key}, which evaluating its weights needs")
        return value

    arch = needed("architecture", hub.get("architecture"))
    num_classes = needed("num_classes", hub.get("num_classes", pretrained.get("num_classes")))
    size_key = f"{prefix}input_size"
    _, height, width = needed(size_key, pretrained.get("input_size"))
    if model_args.get("img_size") is not None and pretrained.get("fixed_input_size"):
        # The weights' own size, as timm takes it: some timm versions wrote the input_size of the
        # model a fine-tune started from (timm.create_model(arch, img_size=384) of a 224 px arch).
        size_key, size = "model_args.img_size", model_args["img_size"]
        height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ConfigError(f"'{path}' has {size_key} {height}x{width}: vitdist evaluates square images")
    crop_mode, interpolation = pretrained.get("crop_mode", "center"), pretrained.get("interpolation", "bicubic")
    if (crop_mode, interpolation) != ("center", "bicubic"):
        log.warning("'%s' asks for a %s crop resized %s; vitdist center-crops and resizes bicubically: the figures "
                    "may differ a little from timm's", path, crop_mode, interpolation)
    meta = {"arch": arch, "timm_kwargs": {**model_args, "num_classes": num_classes, "img_size": height},
            "mean": needed(f"{prefix}mean", pretrained.get("mean")),
            "std": needed(f"{prefix}std", pretrained.get("std")),
            "val_crop_frac": pretrained.get("crop_pct", timm.data.DEFAULT_CROP_PCT)}
    names = hub.get("label_names", pretrained.get("label_names"))
    if names is None and flat:
        names = hub.get("labels")  # the flat form's name for them
    if isinstance(names, dict):  # timm's form for outputs some of which have no name: {index: name}
        names = [names.get(str(i)) for i in range(num_classes)]
        while names and names[-1] is None:  # as vitdist's export records them: the named classes
            names.pop()
    if names:
        meta["classes"] = names
    return meta


def architecture_doubt(init: str | Path, arch: str) -> str | None:
    """A fine-tune from `init` building another timm architecture than the one its weights record,
    whose weights have the same names and shapes (so that the handoff loads them): the two may yet
    compute otherwise (CLIP's QuickGELU against GELU, say). timm's pretrained tags ('.openai') aside."""
    recorded = recorded_arch(locate(init))
    if recorded is None or recorded.split(".")[0] == arch.split(".")[0]:
        return None
    return (f"finetune.init's weights record the architecture '{recorded}', this fine-tune builds model.arch='{arch}': "
            "their weights have the same names and shapes, so they load, but the two may compute otherwise "
            f"(activation, normalisation layers): give it model.arch={recorded} unless the change is meant")


def normalisation_doubt(init: str | Path, data: DataConfig) -> str | None:
    """A fine-tune from `init` normalising its images otherwise than the weights were trained (timm's
    0.5/0.5 weights given ImageNet's mean and std, say): it runs, and starts from features the
    pretrained weights never saw."""
    try:
        recorded = recorded_meta(locate(init))
    except ConfigError:  # a hub config.json short of what evaluation needs: fine-tuning needs none of it
        return None
    if recorded is None:
        return None
    meta, source = recorded
    theirs, mine = [*meta["mean"], *meta["std"]], [*data.mean, *data.std]
    if len(theirs) == len(mine) and all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(theirs, mine)):
        return None
    return (f"finetune.init's weights were trained on images normalised with mean {list(meta['mean'])}, std "
            f"{list(meta['std'])} ('{source}'), this fine-tune normalises with data.mean={list(data.mean)}, "
            f"data.std={list(data.std)}: give it theirs (data.mean=[{','.join(map(str, meta['mean']))}] "
            f"data.std=[{','.join(map(str, meta['std']))}]) unless the change is meant")
