"""`vitdist evaluate`: top-1, top-5 and loss of any checkpoint on any labelled shards, in one process."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from . import distributed
from .checkpoint import MODEL_META, newest_if_run
from .config import Config, ConfigError, DistConfig, ModelConfig
from .config_yaml import load_config
from .data import eval_loader
from .handoff import HandoffError, load_pretrained
from .imagefolder import convert, is_image_folder, scan
from .model import build_model
from .train import evaluate, model_meta


def checkpoint_meta(checkpoint: Path, config: str | None) -> dict:
    """Architecture and normalisation: from the checkpoint itself (a vitdist checkpoint directory,
    or the JSON beside an export), else from the model and data sections of `config`."""
    for meta in (checkpoint / MODEL_META, checkpoint.with_suffix(".json")):
        if meta.is_file():
            return json.loads(meta.read_text())
    if config is None:
        raise ConfigError(f"'{checkpoint}' does not say its architecture: give --config with its model section")
    cfg = load_config(config, ["data.train_shards=unused"])
    return model_meta(cfg.model, cfg.data)


def evaluate_checkpoint(checkpoint: str | Path, data: str, config: str | None = None, batch_size: int = 64,
                        workers: int = 2) -> dict[str, float]:
    checkpoint = newest_if_run(Path(checkpoint))
    meta = checkpoint_meta(checkpoint, config)
    cfg = Config(model=ModelConfig(arch=meta["arch"], **meta["timm_kwargs"]))
    with tempfile.TemporaryDirectory(prefix="vitdist-evaluate-") as tmp:
        if is_image_folder(data):  # an ImageFolder directory: shards for this evaluation only
            # Its sub-folders take the indices of the training classes' names, which the run recorded
            # when it had them; sorted folders fewer than the classes would take wrong labels.
            folder = scan("--data", data, cfg.model.num_classes, meta.get("classes"))
            if "classes" not in meta and len(folder.classes) != cfg.model.num_classes:
                raise ConfigError(
                    f"--data: '{data}' has {len(folder.classes)} class folders for the checkpoint's "
                    f"{cfg.model.num_classes} classes, and '{checkpoint}' does not record its class names (trained "
                    "on shards without a classes.json): the sorted folders would take the wrong labels")
            data = convert(folder, Path(tmp) / "val", max(1, workers), seed=0)
        return _evaluate(checkpoint, cfg, data, batch_size, workers, meta)


def _evaluate(checkpoint: Path, cfg: Config, data: str | list[str], batch_size: int, workers: int,
              meta: dict) -> dict[str, float]:
    cfg.data.val_shards, cfg.data.micro_batch_size, cfg.data.num_workers = data, batch_size, workers
    cfg.data.mean, cfg.data.std = meta["mean"], meta["std"]
    # The run's own validation crop, so that its val/top1 is what this reproduces (a checkpoint from
    # before the crop was recorded: the default).
    cfg.data.val_crop_frac = meta.get("val_crop_frac", cfg.data.val_crop_frac)
    model = build_model(cfg.model)
    kind, fresh = load_pretrained(model, checkpoint)
    if fresh:
        raise HandoffError(f"'{checkpoint}' ({kind}) has no weights for {fresh}: nothing to evaluate with")
    ctx = distributed.init(DistConfig())
    try:
        autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.device.type == "cuda")
        loader = eval_loader(cfg.data, cfg.model.img_size, cfg.model.num_classes, ctx.rank, ctx.world_size,
                             pin_memory=ctx.device.type == "cuda")
        return evaluate(model.to(ctx.device), loader, cfg, ctx, autocast)
    finally:
        distributed.close()
