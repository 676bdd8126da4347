"""Typed run configuration: the dataclass sections, each key's type and bounds, and the checks of
a whole config. `config_yaml` reads it from YAML and `key.sub=value` overrides.

Every key is checked against the dataclasses before any process group starts, so a misspelt
key or a wrong type fails at once with the key's name, never silently hours later.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import operator
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config file, key or value that vitdist refuses."""


# A key's bounds, as `_opt` keywords: checked on every number of its value, shown in the reference.
BOUNDS = {"above": (operator.gt, ">"), "at_least": (operator.ge, ">="), "below": (operator.lt, "<"),
           "at_most": (operator.le, "<=")}


# A year: a round bound well below where torch's store timeout overflows (its nanoseconds, at 9.2e9 s).
MAX_TIMEOUT_S = 365 * 86400


def _opt(default: Any, help: str, **bounds: float) -> Any:
    metadata = {"help": help, "bounds": bounds}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def bounds_text(bounds: dict[str, float]) -> str:
    return " and ".join(f"{BOUNDS[kind][1]} {limit if isinstance(limit, int) else f'{limit:g}'}"
                        for kind, limit in bounds.items())


@dataclass
class ModelConfig:
    arch: str = _opt("vit_base_patch16_224", "timm architecture name; exports name it so timm.create_model rebuilds the model")
    img_size: int = _opt(224, "input resolution in pixels (square)", above=0)
    patch_size: int | None = _opt(None, "patch size in pixels; null keeps the arch's own", above=0)
    embed_dim: int | None = _opt(None, "token width; null keeps the arch's own", above=0)
    depth: int | None = _opt(None, "number of encoder blocks; null keeps the arch's own", above=0)
    num_heads: int | None = _opt(None, "attention heads; null keeps the arch's own", above=0)
    mlp_ratio: float | None = _opt(None, "MLP hidden width / token width; null keeps the arch's own", above=0)
    num_classes: int = _opt(1000, "classifier outputs; labels must lie in [0, num_classes)", above=0)
    drop_path_rate: float = _opt(0.0, "stochastic depth rate of the last block (linear from 0)", at_least=0, below=1)
    grad_checkpointing: bool = _opt(False, "recompute every block's activations in backward to save memory")


@dataclass
class DataConfig:
    train_shards: Union[str, list[str]] = _opt("", "training shards: a brace pattern, a list, or a .txt file of URLs (paths, pipe:, or any webdataset opens: http:, gs:, ...); or an ImageFolder directory")
    val_shards: Union[str, list[str], None] = _opt(None, "validation shards or ImageFolder directory, same forms; null: no validation")
    micro_batch_size: int = _opt(64, "samples per rank per forward/backward; accumulation makes up the global batch",
                                 above=0)
    num_workers: int = _opt(4, "loader worker processes per rank", at_least=0)
    streams: int = _opt(8, "virtual data streams; a multiple of ranks x workers; fixes the data order independently of "
                           "hardware", above=0)
    shuffle_block: int = _opt(1000, "samples shuffled together within a stream (memory holds the encoded bytes)",
                              above=0)
    seed: int = _opt(0, "seed of shard order, sample shuffling and the crops, flips and RandAugment ops drawn for each sample", at_least=0)
    crop_scale: list[float] = _opt([0.08, 1.0], "RandomResizedCrop area range", above=0, at_most=1)
    crop_ratio: list[float] = _opt([0.75, 1.3333333], "RandomResizedCrop aspect ratio range", above=0)
    hflip: float = _opt(0.5, "probability of a horizontal flip", at_least=0, at_most=1)
    rand_augment: str | None = _opt(
        None, "timm's RandAugment on each training crop, its config string: rand-m9-mstd0.5-inc1 is DeiT's; null: off. "
        "Runs in the loader workers on the CPU path, so data.decode=auto decodes there (gpu is refused)")
    aug_repeats: int = _opt(
        1, "each training sample read is augmented this many times, each copy with its own crop, flip and RandAugment "
        "draws, all in the same step (repeated augmentation: timm's --aug-repeats; DeiT's recipe uses 3): a step then "
        "holds train.global_batch_size / data.aug_repeats samples. train.global_batch_size / data.streams must be a "
        "multiple of it", above=0)
    random_erase: float = _opt(0.0, "probability of erasing a rectangle of each training image with normal noise "
                                    "(timm's RandomErasing, mode pixel; DeiT's: 0.25), on the training device; 0: off",
                               at_least=0, at_most=1)
    val_crop_frac: float = _opt(0.875, "validation: resize the shorter side to floor(img_size / val_crop_frac), then "
                                       "center crop img_size (timm's crop_pct)", above=0, at_most=1)
    # Bounded to the 0..1 scale: 0-255 values (mmcv's, OpenCV recipes') were taken, and a run learned nothing
    mean: list[float] = _opt([0.485, 0.456, 0.406], "per-channel normalisation mean (0..1 scale)", at_least=0, at_most=1)
    std: list[float] = _opt([0.229, 0.224, 0.225], "per-channel normalisation std (0..1 scale)", above=0, at_most=1)
    prefetch_steps: int = _opt(2, "optimizer steps of data each loader worker prepares ahead", above=0)
    decode: Literal["auto", "cpu", "gpu"] = _opt(
        "auto", "training images: cpu: loader workers decode (PIL) and crop them (torch's uint8 resize); gpu: workers hand "
        "over the JPEG bytes and crop boxes, the training device decodes (nvJPEG on CUDA) and resizes them in batches, "
        "to the pixels of cpu with data.jpeg_reduce=false; "
        "other images still decode in the workers; auto: gpu when training on CUDA (unless data.rand_augment), else cpu. Validation always decodes in the "
        "workers. A resume that switches cpu and gpu warns: JPEGs broken past their headers put other samples in the "
        "steps from there")
    jpeg_reduce: bool = _opt(
        True, "training crops decoded in the workers (data.decode=cpu; with gpu, the greyscale and CMYK JPEGs): a JPEG "
        "whose crop is at least 2, 4 or 8 times model.img_size a side is decoded at 1/2, 1/4 or 1/8 scale by libjpeg "
        "(DCT scaling), then cropped and resized: one core's crops/s at 224 px gain 1.26x on 1024x768 photos, 1.5x on "
        "1600x1200, 1.6x on 2048x1536, nothing on 500x375 (no crop is 448 px a side); the crops reduced are 1.8-2.6 "
        "levels of 255 from a full decode's on average. false: torchvision's RandomResizedCrop's pixels, and "
        "data.decode=gpu's")
    min_image_side: int = _opt(
        8, "skip (as too_small) images whose shorter side has fewer pixels: 1x1 tracking pixels and broken thumbnails "
        "hold nothing to crop, while 32 px images (CIFAR, icons) pass", at_least=0)
    max_image_pixels: int = _opt(
        100_000_000, "skip (as too_large) images of more pixels, judged from the header before any pixel is decoded: "
        "a decompression bomb never allocates; in validation, also the image resized for its crop; 100M pixels (300 MB as RGB) is beyond any common camera. PIL refuses images "
        "over 2 x PIL.Image.MAX_IMAGE_PIXELS (179M) itself, also counted as too_large", above=0)
    max_skip_frac: float = _opt(
        0.1, "stop the run (error, exit 2) when more than this fraction of the training samples read were skipped; "
        "judged at log steps from step 10 on, so that one corrupt shard met first does not stop a run; 1: never stop",
        at_least=0, at_most=1)


@dataclass
class OptimConfig:
    lr: float = _opt(1e-3, "peak learning rate (AdamW)", at_least=0)
    min_lr: float = _opt(1e-5, "learning rate at the end of the cosine decay", at_least=0)
    warmup_steps: int = _opt(1000, "optimizer steps of linear warmup", at_least=0)
    weight_decay: float = _opt(0.05, "AdamW weight decay (not applied to norms, biases, pos_embed, cls_token)",
                               at_least=0)
    betas: list[float] = _opt([0.9, 0.999], "AdamW betas", at_least=0, below=1)
    eps: float = _opt(1e-8, "AdamW epsilon", above=0)
    clip_grad_norm: float = _opt(1.0, "clip gradients to this global norm; 0 disables clipping", at_least=0)


@dataclass
class TrainConfig:
    steps: int = _opt(10000, "optimizer steps to train", above=0)
    global_batch_size: int = _opt(1024, "samples per optimizer step, over all ranks", above=0)
    precision: Literal["bf16", "fp32"] = _opt("bf16", "compute dtype of forward/backward (DDP: autocast; FSDP: parameters gathered in it); weights and optimizer stay fp32")
    # NumPy's generator (mixup's draws) takes 32 bits: a larger seed failed at the first step
    seed: int = _opt(0, "seed of model initialisation and of the random draws on the device (drop path, mixup/cutmix, random erasing)", at_least=0, below=2**32)
    compile: bool = _opt(False, "torch.compile the model")
    activation_memory_budget: float = _opt(
        1.0, "compiled runs: the share of the activations for backward that compile's partitioner may keep (0.5 keeps "
        "about half); it recomputes the rest, choosing what costs the fewest FLOPs per byte freed; 0: recompute all "
        "it can (about twice what model.grad_checkpointing keeps). Less memory than no checkpointing, less recompute "
        "than full; needs train.compile, and model.drop_path_rate=0", at_least=0, at_most=1)
    resume: Union[Literal["auto", "none"], str] = _opt(
        "auto", "auto: newest complete checkpoint in run.dir if any; none (or null): start fresh (refused where "
                "run.dir holds checkpoints); or a checkpoint path (once run.dir holds a newer checkpoint, as after a "
                "requeue, that one)")
    eval_every_steps: int = _opt(0, "validate every N steps (and at the end); 0: only at the end", at_least=0)
    label_smoothing: float = _opt(0.1, "label smoothing of the classification loss", at_least=0, at_most=1)
    mixup_alpha: float = _opt(0.0, "mixup alpha (timm Mixup); 0 disables", at_least=0)
    cutmix_alpha: float = _opt(0.0, "cutmix alpha (timm Mixup); 0 disables", at_least=0)
    ema_decay: float = _opt(
        0.0, "keep an exponential moving average of the weights, updated after each optimizer step with this decay "
        "(timm's model EMA; DeiT's: 0.99996): validated beside the weights (val_ema/), kept in checkpoints, written "
        "by `vitdist export --ema`; one more fp32 copy of each rank's parameters; 0: none", at_least=0, below=1)
    ema_warmup: bool = _opt(False, "the average's decay rises as 1 - step^(-2/3) up to train.ema_decay (timm's EMA "
                                   "warmup): it forgets the random initial weights early, which short runs need")
    max_bad_steps: int = _opt(10, "stop after N steps in a row with a NaN/Inf loss or gradient norm on some rank "
                                  "(each one is skipped, no update; none is checkpointed); 0: never stop", at_least=0)


@dataclass
class DistConfig:
    strategy: Literal["ddp", "fsdp"] = _opt("ddp", "ddp: replicated model; fsdp: FSDP2, parameters, gradients and optimizer state sharded")
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = _opt("fp32", "fsdp: dtype of the gradient reduce-scatter")
    fsdp_reshard_after_forward: bool = _opt(True, "fsdp: free gathered parameters after forward (less memory, one more all-gather)")
    backend: Literal["auto", "nccl", "gloo"] = _opt("auto", "auto: nccl with GPUs, gloo on CPU")
    timeout_s: int = _opt(600, "collective timeout in seconds", above=0, at_most=MAX_TIMEOUT_S)


@dataclass
class CkptConfig:
    every_steps: int = _opt(1000, "save a checkpoint every N steps (and at the end); 0: only at the end", at_least=0)
    keep: int = _opt(3, "keep the newest K complete checkpoints; 0 keeps all", at_least=0)
    keep_every: int = _opt(0, "also keep every checkpoint whose step is a multiple of N; 0: none", at_least=0)
    async_save: bool = _opt(False, "write in a background thread; training stalls only for the copy to host memory")
    on_error: Literal["stop", "continue"] = _opt(
        "stop", "a save that fails (disk full, unwritable directory): stop the run, or log it and train on; "
        "a failed final save always stops")


@dataclass
class LogConfig:
    every_steps: int = _opt(10, "console and TensorBoard line every N steps, and at step 1 and at checkpoint and validation steps", above=0)
    peak_tflops: float | None = _opt(None, "per-device matmul peak that perf/mfu divides by; null: measured at start "
                                           "(bf16 or fp32, per train.precision)", above=0)
    profile_steps: list[int] = _opt([], "[first, last]: profile these optimizer steps (host and GPU, the data waits "
                                        "included) with torch.profiler, a trace per rank in <run.dir>/profile/ for "
                                        "ui.perfetto.dev; []: none", above=0)


@dataclass
class FinetuneConfig:
    init: str | None = _opt(None, "weights to start from: a vitdist checkpoint or export, a timm or torchvision ViT state dict, a timm hub folder")
    layer_decay: float = _opt(1.0, "layer-wise lr decay: block i gets lr x decay^(depth - i), the head lr; 1: off",
                              above=0, at_most=1)
    freeze: Literal["none", "backbone"] = _opt("none", "backbone: train the head only (linear probe)")
    init_ema: bool = _opt(False, "start from the average of the weights that finetune.init's run kept "
                                 "(train.ema_decay), not from its weights: a vitdist checkpoint, or a run's checkpoints/")
    new_head: bool = _opt(False, "true: a freshly initialised classifier head even where the checkpoint's has "
                                 "model.num_classes outputs (other classes, as many); false: kept where it fits")


@dataclass
class RunConfig:
    dir: str = _opt("runs/default", "run directory: config.yaml, checkpoints/, tb/, best.safetensors and best.json, run.lock, "
                                  "FINISHED or FATAL")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return "null" if tp is type(None) else tp.__name__


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming the key."""
    origin = get_origin(tp)
    if _is_union(tp):
        for option in get_args(tp):
            try:
                return _check_value(key, value, option)
            except ConfigError:
                pass
    elif origin is Literal:
        if value is None and "none" in get_args(tp):  # null (~, None) in the key's own word
            return "none"
        if value in get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_check_value(f"{key}[{i}]", v, get_args(tp)[0]) for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):  # a NaN would pass every bound
            return number
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, (float, str)):  # train.steps=1e5: a whole number (PyYAML reads 1e5 as a string)
            try:
                number = decimal.Decimal(value)
            except decimal.InvalidOperation:
                number = None
            if number is not None and number.is_finite() and number == number.to_integral_value():
                return int(number)
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def sections() -> dict[str, type]:
    """The config's sections, name -> dataclass, in the order of `Config`."""
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def _key_type(key: str) -> Any:
    """The type of config key `section.name`; ConfigError for a key that does not exist."""
    parts = key.split(".")
    known = sections()
    if len(parts) != 2 or parts[0] not in known:
        raise ConfigError(f"unknown config key '{key}'; keys are <section>.<name> with sections: {', '.join(known)}")
    section, name = parts
    hints = typing.get_type_hints(known[section])
    if name not in hints:
        raise ConfigError(f"unknown config key '{key}'; valid keys in '{section}': {', '.join(hints)}")
    return hints[name]


def takes_text(key: str) -> bool:
    """Whether config key `key` (ConfigError if there is none) takes text: a name, a path, a pattern."""
    tp = _key_type(key)
    return tp is str or (_is_union(tp) and str in get_args(tp))


# Keys that name local paths. The shell expands no `~` after `run.dir=` (not a variable assignment
# to it), and the run would have written into a directory named `~` in the working directory.
PATH_KEYS = ("data.train_shards", "data.val_shards", "train.resume", "finetune.init", "run.dir")


def _expand_home(value: Any) -> Any:
    if isinstance(value, list):
        return [_expand_home(item) for item in value]
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set `key` of `cfg` to `value` as the key's type (a path's leading `~` the home directory);
    ConfigError naming the key if it is not one."""
    tp = _key_type(key)
    section, name = key.split(".")
    value = _check_value(key, value, tp)
    setattr(getattr(cfg, section), name, _expand_home(value) if key in PATH_KEYS else value)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def reference_markdown() -> str:
    """The config reference table for README.md, generated from the dataclasses."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for section, cls in sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = yaml.safe_dump(default, default_flow_style=True).removesuffix("...\n").strip()
            type_name = _type_name(hints[f.name]).replace("|", "\\|")
            if f.metadata["bounds"]:
                type_name += f", {bounds_text(f.metadata['bounds'])}"
            lines.append(f"| `{section}.{f.name}` | {type_name} | `{shown}` | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"
