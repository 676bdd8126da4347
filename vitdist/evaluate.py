"""`vitdist evaluate`: top-1, top-5 and loss of any checkpoint on any labelled shards, in one process."""

from __future__ import annotations

import tempfile
from pathlib import Path

import timm
import torch

from . import distributed
from .config import Config, ConfigError, DataConfig, DistConfig, ModelConfig
from .config_yaml import load_config
from .data import EvalLoader
from .handoff import HUB_WEIGHTS, HandoffError, load_located, locate, read_state_dict
from .imagefolder import convert, is_image_folder, same_classes, scan
from .model import model_meta
from .recorded import HUB_CONFIG, recorded_meta
from .shard_list import expand_urls, probe
from .validation import evaluate


def checkpoint_meta(checkpoint: Path, config: str | None) -> tuple[dict, str]:
    """What builds and feeds the model (arch, timm kwargs, normalisation, validation crop, class
    names), and the file that says it: what the checkpoint records, else the model and data sections
    of `config`."""
    recorded = recorded_meta(checkpoint)
    if recorded is not None:
        return recorded
    if config is None:
        beside = f" and has no {HUB_CONFIG} beside it" if checkpoint.name in HUB_WEIGHTS else ""
        raise ConfigError(f"'{checkpoint}' does not say its architecture{beside}: give --config with its model section")
    cfg = load_config(config, ["data.train_shards=unused"])
    return model_meta(cfg.model, cfg.data), config


def evaluate_checkpoint(checkpoint: str | Path, data: str, config: str | None = None, batch_size: int = 64,
                        workers: int = 2, timeout_s: int = 600, average: bool = False) -> dict[str, float]:
    """`timeout_s`: how long a loader worker may deliver nothing before the evaluation stops.
    `average`: the average of the weights a vitdist checkpoint's run kept (train.ema_decay)."""
    checkpoint = locate(checkpoint)  # once: its metadata and weights are read from the same one
    meta, source = checkpoint_meta(checkpoint, config)
    if not timm.is_model(meta["arch"]):
        raise ConfigError(f"'{source}' names the architecture '{meta['arch']}', which timm {timm.__version__} does not have")
    kwargs = meta["timm_kwargs"]
    with tempfile.TemporaryDirectory(prefix="vitdist-evaluate-") as tmp:
        if is_image_folder(data):  # an ImageFolder directory: shards for this evaluation only
            # Its sub-folders take the indices of the model's outputs by name, where the checkpoint
            # names them; sorted folders fewer than the outputs would take wrong labels.
            folder = scan("--data", data, kwargs["num_classes"], meta.get("classes"))
            if "classes" not in meta and len(folder.classes) != kwargs["num_classes"]:
                raise ConfigError(
                    f"--data: '{data}' has {len(folder.classes)} class folders for the checkpoint's "
                    f"{kwargs['num_classes']} classes, and '{source}' does not name them (a vitdist run trained on "
                    f"shards without a classes.json, a {HUB_CONFIG} without label_names): the sorted folders would "
                    "take the wrong labels")
            data = convert(folder, Path(tmp) / "val", max(1, workers), seed=0)
        else:
            urls = expand_urls(data, "--data")  # checked before the model loads
            same_classes("--data", urls, meta.get("classes"), f"'{source}'")
            probe(urls, DataConfig(), kwargs["num_classes"], "--data", timeout_s)
        return _evaluate(checkpoint, meta, source, data, batch_size, workers, timeout_s, average)


def _evaluate(checkpoint: Path, meta: dict, source: str, data: str | list[str], batch_size: int, workers: int,
              timeout_s: int, average: bool) -> dict[str, float]:
    kwargs = meta["timm_kwargs"]
    cfg = Config(model=ModelConfig(arch=meta["arch"], img_size=kwargs["img_size"], num_classes=kwargs["num_classes"]),
                 dist=DistConfig(timeout_s=timeout_s))
    cfg.data.val_shards, cfg.data.micro_batch_size, cfg.data.num_workers = data, batch_size, workers
    cfg.data.mean, cfg.data.std = meta["mean"], meta["std"]
    # The run's own validation crop, so that its val/top1 is what this reproduces (a checkpoint from
    # before the crop was recorded: the default).
    cfg.data.val_crop_frac = meta.get("val_crop_frac", cfg.data.val_crop_frac)
    # As the export's JSON and a hub folder's config.json say to rebuild the model: with all the
    # weights' arguments (a hub model's may be other than those of vitdist's config, e.g. global_pool).
    model = timm.create_model(meta["arch"], pretrained=False, **kwargs)
    # Weights of any other shape are refused, not fitted as for fine-tuning (a head left to train
    # anew, position or patch embeddings resampled), which would score another model.
    weights, kind = read_state_dict(checkpoint, meta=True, average=average)
    found = [f"{key} is {tuple(weights[key].shape)} there, {tuple(value.shape)} in the model" if key in weights
             else f"it has no {key}" for key, value in model.state_dict().items()
             if key not in weights or weights[key].shape != value.shape]
    if found:
        raise HandoffError(f"'{checkpoint}' ({kind}) does not fit the model that '{source}' describes ({meta['arch']}, "
                           f"{kwargs['img_size']} px, {kwargs['num_classes']} classes): {'; '.join(found)}; nothing to "
                           "evaluate with")
    load_located(model, checkpoint, average=average)
    ctx = distributed.init(cfg.dist)
    try:
        autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.device.type == "cuda")
        loader = EvalLoader(cfg.data, cfg.model.img_size, cfg.model.num_classes, ctx.rank, ctx.world_size,
                            pin_memory=ctx.device.type == "cuda", timeout_s=cfg.dist.timeout_s)
        return evaluate(model.to(ctx.device), loader, cfg, ctx, autocast)
    finally:
        distributed.close()
