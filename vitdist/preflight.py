"""The config check before any process group starts: everything that can be refused
(ConfigError) from the config, the shards and the checkpoints' metadata alone, so that a bad key or
a missing shard costs seconds, not a queued job's start-up on every node."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import checkpoint, imagefolder, resume
from .augment import RandAugment
from .config import Config, ConfigError
from .config_check import batch_layout
from .handoff import HandoffError, check_fit
from .model import check_model
from .recorded import architecture_doubt, normalisation_doubt
from .shard_list import expand_urls, probe, train_shard_urls


def preflight(cfg: Config, world_size: int) -> list[str]:
    """Everything that can be refused before a process group starts (ConfigError): the batch
    layout for this world size, a run.dir that cannot be made or written, the shard lists (or ImageFolder directories), the architecture,
    the checkpoint to resume from or else `finetune.init` (whether it fits the model, from its
    metadata alone), and (rank 0) the first samples of the shards. Returns the doubts these raise
    that are not refusals."""
    batch_layout(cfg, world_size)
    _refuse_unwritable(Path(cfg.run.dir))
    if cfg.dist.backend == "nccl" and not torch.cuda.is_available():  # else a traceback in init, exit 1, retried
        raise ConfigError("dist.backend=nccl needs CUDA GPUs, and torch sees none here (torch.cuda.is_available() is "
                          "False): use dist.backend=auto (gloo on a CPU) or gloo")
    folders = imagefolder.image_folders(cfg.data, cfg.model.num_classes)  # converted to shards in _train
    train_data = folders["train"] if "train" in folders else train_shard_urls(cfg.data, world_size)
    val_urls = expand_urls(cfg.data.val_shards, "data.val_shards") if cfg.data.val_shards and "val" not in folders else []
    if cfg.data.rand_augment:
        RandAugment(cfg.data, cfg.model.img_size)  # refuses a config string timm cannot read
    model, found = check_model(cfg.model), []
    try:
        resume_from = checkpoint.resume_path(cfg.train.resume, Path(cfg.run.dir) / "checkpoints")
    except (FileNotFoundError, FileExistsError) as e:
        raise ConfigError(str(e)) from None
    if resume_from is not None:
        try:
            found += resume.check(cfg, resume_from, train_data, model)
        except ConfigError as e:
            if checkpoint.passed_over(cfg.train.resume, resume_from):  # else the checkpoint refused is not the one named
                raise ConfigError(f"{e} (train.resume='{cfg.train.resume}' is older than this run's newest checkpoint, "
                                  "which a resume takes: move the newer ones away to resume the one named)") from None
            raise
    elif cfg.finetune.init:  # what _train loads when it does not resume: a resume never reads it
        try:
            check_fit(model, cfg.finetune.init, cfg.finetune.init_ema)
        except HandoffError as e:
            raise ConfigError(f"finetune.init='{cfg.finetune.init}': {e}") from None
        found += [doubt for doubt in (architecture_doubt(cfg.finetune.init, cfg.model.arch),
                                      normalisation_doubt(cfg.finetune.init, cfg.data)) if doubt]
    if os.environ.get("RANK", "0") == "0":  # last, as the slowest: one reader of the shards' heads, not thousands
        for split, folder in folders.items():  # a stat per image; after resume.check, whose refusal names the checkpoint
            imagefolder.conversion_in(folder, imagefolder.conversion_dir(cfg.run.dir) / split, cfg.data.streams,
                                      cfg.data.seed)
        for key, urls in (("data.train_shards", [] if "train" in folders else train_data), ("data.val_shards", val_urls)):
            if urls:
                probe(urls, cfg.data, cfg.model.num_classes, key, cfg.dist.timeout_s)
    return found


def _refuse_unwritable(run_dir: Path) -> None:
    """A run.dir that cannot be made or written to, refused with the config: also under --check by
    hand, which takes no run lock (whose opening finds it), where it passed, to fail at the run's
    first write."""
    there = run_dir
    try:  # lexists: a link to nothing is there, to be refused, and a folder that cannot be entered is not
        while not os.path.lexists(there) and there != there.parent:
            there = there.parent
        is_dir = there.is_dir()
    except OSError as e:
        raise ConfigError(f"run.dir '{run_dir}' cannot be made: {e}") from None
    if not is_dir:
        raise ConfigError(f"run.dir '{run_dir}' cannot be made: '{there}' is not a directory (a file, or a link to "
                          "nothing)")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir '{run_dir}' cannot be written: '{there}' is not writable by this user")
