"""What a config's keys cannot say one by one: the refusals that span keys (validate), what is
allowed but likely a mistake (doubts), and the batch layout on a given world size."""

from __future__ import annotations

import dataclasses

from .config import BOUNDS, Config, ConfigError, bounds_text, sections


def validate(cfg: Config) -> None:
    """Each key's bounds, then what the types and bounds cannot express."""
    for section, cls in sections().items():
        for f in dataclasses.fields(cls):
            value = getattr(getattr(cfg, section), f.name)
            for number in value if isinstance(value, list) else [value]:
                if number is not None and not all(BOUNDS[kind][0](number, limit)
                                                  for kind, limit in f.metadata["bounds"].items()):
                    raise ConfigError(f"config key '{section}.{f.name}' must be {bounds_text(f.metadata['bounds'])}, "
                                      f"got {value}")
                if isinstance(number, int) and abs(number) >= 2**63:  # torch's and numpy's integers, float()'s range
                    raise ConfigError(f"config key '{section}.{f.name}' is a number of {number.bit_length()} bits, "
                                      "more than a 64-bit integer holds")  # not in digits: str() refuses 4300 and more
    for key, value in {"data.crop_scale": cfg.data.crop_scale, "data.crop_ratio": cfg.data.crop_ratio,
                       "optim.betas": cfg.optim.betas}.items():
        if len(value) != 2:
            raise ConfigError(f"config key '{key}' must have 2 numbers, got {value}")
    for key, (low, high) in {"data.crop_scale": cfg.data.crop_scale, "data.crop_ratio": cfg.data.crop_ratio}.items():
        if low > high:
            raise ConfigError(f"config key '{key}' is a range, low to high: got {[low, high]}")
    profiled = cfg.log.profile_steps
    if profiled and (len(profiled) != 2 or profiled[0] > profiled[1]):
        raise ConfigError(f"config key 'log.profile_steps' is [first, last] (steps from 1), or [] for none: got {profiled}")
    for key, value in {"data.mean": cfg.data.mean, "data.std": cfg.data.std}.items():
        if len(value) != 3:
            raise ConfigError(f"config key '{key}' must have 3 numbers (RGB), got {value}")
    budget = cfg.train.activation_memory_budget
    if budget < 1 and not cfg.train.compile:
        raise ConfigError("train.activation_memory_budget < 1 needs train.compile=true: compile's partitioner chooses "
                          "what to recompute")
    if budget < 1 and cfg.model.grad_checkpointing:
        raise ConfigError("train.activation_memory_budget < 1 and model.grad_checkpointing=true are two ways to "
                          "recompute activations: choose one")
    if budget < 1 and cfg.model.drop_path_rate > 0:
        # The partitioner may recompute drop path's random mask in backward, with new draws: the gradients
        # would not be those of the forward's masks (pytorch/pytorch#190758). Checkpointing replays the draws.
        raise ConfigError(f"train.activation_memory_budget={budget} with model.drop_path_rate={cfg.model.drop_path_rate}: "
                          "compile's partitioner would draw drop path's masks again in backward, other than the "
                          "forward's, and the gradients would be wrong; use model.grad_checkpointing=true instead, "
                          "or model.drop_path_rate=0")
    if (cfg.train.mixup_alpha or cfg.train.cutmix_alpha) and cfg.data.micro_batch_size % 2:
        raise ConfigError(f"train.mixup_alpha / train.cutmix_alpha need an even data.micro_batch_size (timm's Mixup "
                          f"pairs each sample with the batch's reverse), got {cfg.data.micro_batch_size}")
    if cfg.data.rand_augment == "":  # off, as null is: most likely a variable that was not set
        raise ConfigError("config key 'data.rand_augment' is empty: give a RandAugment string "
                          "(rand-m9-mstd0.5-inc1), or null for none")
    if cfg.data.rand_augment and cfg.data.decode == "gpu":
        raise ConfigError("data.rand_augment runs timm's RandAugment on PIL images in the loader workers, which "
                          "data.decode=gpu leaves encoded: use data.decode=cpu or auto")
    if cfg.train.ema_warmup and not cfg.train.ema_decay:
        raise ConfigError("train.ema_warmup=true warms up an average of the weights that train.ema_decay=0 does not "
                          "keep: give train.ema_decay (0.9999, say), or train.ema_warmup=false")
    if cfg.finetune.init_ema and not cfg.finetune.init:
        raise ConfigError("finetune.init_ema=true takes the average of the weights kept in finetune.init's checkpoint, "
                          "and finetune.init is not set")
    if not cfg.data.train_shards:
        raise ConfigError("config key 'data.train_shards' is empty: give a brace pattern, a list or a .txt file of shards")
    if cfg.data.val_shards in ("", []):  # "": the working directory, which a run validated on as an ImageFolder
        raise ConfigError("config key 'data.val_shards' is empty: give shards, or null for no validation")
    if cfg.train.global_batch_size % cfg.data.streams:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by data.streams={cfg.data.streams}: "
            "every global batch takes the same number of samples from each stream")
    if (cfg.train.global_batch_size // cfg.data.streams) % cfg.data.aug_repeats:
        raise ConfigError(
            f"data.aug_repeats={cfg.data.aug_repeats} does not divide the {cfg.train.global_batch_size // cfg.data.streams} "
            f"samples a step takes from each stream (train.global_batch_size={cfg.train.global_batch_size} / "
            f"data.streams={cfg.data.streams}): a stream's part of a step holds whole groups of copies")


def doubts(cfg: Config) -> list[str]:
    """What is allowed but likely a mistake, such as a short run's overrides on a long run's config."""
    found = []
    optim, train = cfg.optim, cfg.train
    if optim.warmup_steps > train.steps:
        found.append(f"optim.warmup_steps={optim.warmup_steps} > train.steps={train.steps}: the learning rate rises to "
                     f"{train.steps / optim.warmup_steps:.3g} of optim.lr={optim.lr:g} and never decays")
    if optim.min_lr > optim.lr:
        found.append(f"optim.min_lr={optim.min_lr:g} > optim.lr={optim.lr:g}: the learning rate rises after the warmup")
    if cfg.finetune.freeze == "backbone" and cfg.model.drop_path_rate > 0:
        found.append(f"finetune.freeze=backbone with model.drop_path_rate={cfg.model.drop_path_rate:g}: the frozen blocks "
                     "are still dropped at random in training, so the head learns from noisier features than it is "
                     "evaluated on (a linear probe usually has 0)")
    if cfg.finetune.freeze == "backbone" and not cfg.finetune.init:
        found.append("finetune.freeze=backbone without finetune.init: the head is trained on a backbone of random "
                     "weights, frozen")
    if cfg.log.profile_steps and cfg.log.profile_steps[0] > train.steps:
        found.append(f"log.profile_steps={cfg.log.profile_steps}, but the run ends at train.steps={train.steps}: "
                     "nothing is profiled")
    if train.eval_every_steps and not cfg.data.val_shards:
        found.append(f"train.eval_every_steps={train.eval_every_steps}, but data.val_shards is null: nothing is validated")
    return found


def batch_layout(cfg: Config, world_size: int) -> int:
    """Gradient accumulation steps for this world size; a layout that cannot divide is a ConfigError."""
    global_batch, micro, streams = cfg.train.global_batch_size, cfg.data.micro_batch_size, cfg.data.streams
    workers = max(1, cfg.data.num_workers)
    # The streams first: a resume cannot change them, so the other refusals' fixes would not help.
    if streams % world_size:
        ranks = ", ".join(str(n) for n in range(1, streams + 1) if streams % n == 0)
        raise ConfigError(
            f"data.streams={streams} cannot be dealt out to {world_size} ranks, each owning whole streams: run on a "
            f"number of ranks that divides it ({ranks}), or, for a new run, give data.streams a multiple of "
            f"{world_size} (a run keeps its streams: they fix its data order)")
    if global_batch % (world_size * micro):
        # The rank's share is whole: global_batch is a multiple of the streams (validate), they of the ranks.
        per_rank = global_batch // world_size
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by world size {world_size} x "
            f"data.micro_batch_size={micro} (global = world x micro x accumulation steps): each rank takes {per_rank} "
            f"samples a step: give data.micro_batch_size="
            f"{max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)}, the largest below {micro} "
            "that divides it")
    if streams % (world_size * workers):
        per_rank = streams // world_size
        raise ConfigError(
            f"data.streams={streams} is not a multiple of ranks x workers = {world_size} x {workers} = "
            f"{world_size * workers}; each loader worker must own whole streams: give data.num_workers a divisor of "
            f"{per_rank}, the streams per rank")
    return global_batch // (world_size * micro)
