"""Demo data. Built in: shapes drawn at random colour, position, scale, rotation, stroke width and
sharpness on a noisy background, one class per shape, which a ViT learns on a CPU in minutes (for
pretraining). Real: scikit-learn's 1,797 scanned handwritten digits, upscaled (for fine-tuning).
Photo-like noise images that compress as photos do (for loader tests and benchmarks)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .make_shards import make_shards

CLASSES = ("circle", "ring", "square", "frame", "triangle", "diamond", "plus", "cross")


def _polygon(cx: float, cy: float, r: float, corners: int, turn: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(turn + 2 * math.pi * k / corners), cy + r * math.sin(turn + 2 * math.pi * k / corners))
            for k in range(corners)]


def draw_shape(name: str, size: int, rng: random.Random) -> Image.Image:
    """Drawn at a random resolution, then scaled to `size`: from sharp to as blurred as an upscaled
    scan. Half light-on-dark grey, half in colour; outlines and bars of random thickness; noise of
    random strength."""
    res = rng.randint(max(8, size // 4), size)
    if rng.random() < 0.5:
        background, foreground = (rng.randrange(64),) * 3, (rng.randrange(160, 256),) * 3
    else:
        background = tuple(rng.randrange(256) for _ in range(3))
        # Far from the background in at least one channel, so every shape is visible.
        foreground = tuple((c + rng.randrange(96, 160)) % 256 for c in background)
    image = Image.new("RGB", (res, res), background)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.2, 0.45) * res
    cx, cy = rng.uniform(r, res - r), rng.uniform(r, res - r)
    turn = rng.uniform(-0.4, 0.4)
    width = max(1, round(r * rng.uniform(0.15, 0.45)))
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=foreground)
    elif name == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=foreground, width=width)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, turn + math.pi / 4), fill=foreground)
    elif name == "frame":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, turn + math.pi / 4), outline=foreground, width=width)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, turn - math.pi / 2), fill=foreground)
    elif name == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, turn), fill=foreground)
    else:  # plus, cross: two bars, upright or diagonal
        base = turn + (math.pi / 4 if name == "cross" else 0.0)
        for angle in (base, base + math.pi / 2):
            dx, dy = r * math.cos(angle), r * math.sin(angle)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=foreground, width=width)
    image = image.resize((size, size), Image.BILINEAR)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(0, 12), (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def _smooth_field(rng: np.random.Generator, cells: int, width: int, height: int, amplitude: float,
                  channels: int) -> np.ndarray:
    """Random values on a coarse grid (`cells` rows), bicubically upsampled: structure at one scale."""
    grid = rng.uniform(-amplitude, amplitude, (cells, max(1, round(cells * width / height)), channels))
    planes = [Image.fromarray(grid[..., c].astype(np.float32), mode="F").resize((width, height), Image.BICUBIC)
              for c in range(channels)]
    return np.stack([np.asarray(p) for p in planes], axis=-1)


def draw_photo(width: int, height: int, rng: np.random.Generator, grain: float = 14.0) -> Image.Image:
    """An image that compresses like a photo: colour structure at three scales, and grain whose
    strength varies over the image as texture does. 500x375 at JPEG quality 90 takes about 80 KB."""
    structure = sum(_smooth_field(rng, cells, width, height, amplitude, 3)
                    for cells, amplitude in ((3, 90), (12, 40), (48, 20)))
    texture = grain * (1 + _smooth_field(rng, 4, width, height, 0.9, 1))
    pixels = 128 + structure + rng.normal(0, 1, structure.shape) * texture
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _drop_shards(folder: Path, prefix: str) -> None:
    """The demo's shards of an earlier write (one cut short, which launch/demo.sh writes again):
    make_shards refuses to write over shards, and the demo's are drawn again alike."""
    for shard in folder.glob(f"{prefix}-*.tar"):
        shard.unlink()


def write_demo_dataset(out_dir: str | Path, train_per_class: int = 600, val_per_class: int = 100,
                       image_size: int = 40, samples_per_shard: int = 300, seed: int = 0) -> dict[str, str]:
    """Draw the images as an ImageFolder under `out_dir/images`, then shard them with make-shards,
    as a user would. Returns the brace patterns of the train and val shards."""
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    patterns = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for name in CLASSES:
            folder = out_dir / "images" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                draw_shape(name, image_size, rng).save(folder / f"{name}_{i:05d}.png")
        _drop_shards(out_dir / "shards", split)
        patterns[split] = make_shards(out_dir / "images" / split, out_dir / "shards", prefix=split,
                                      samples_per_shard=samples_per_shard, seed=seed, progress=False)
    return patterns


def write_digits_dataset(out_dir: str | Path, image_size: int = 32, val_count: int = 497, streams: int = 16,
                         seed: int = 0) -> dict[str, str]:
    """scikit-learn's 8x8 handwritten digits (real scans, 10 classes), upscaled to `image_size`,
    split train/val, written as an ImageFolder and sharded for data.streams=`streams` (one shard per
    stream: each sample once per epoch)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(seed).shuffle(order)
    splits = {"train": order[val_count:], "val": order[:val_count]}  # train first: its classes.json labels both
    out_dir = Path(out_dir)
    patterns = {}
    for split, indices in splits.items():
        for i in indices:
            folder = out_dir / "images" / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            grey = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8))
            grey.resize((image_size, image_size), Image.BILINEAR).convert("RGB").save(folder / f"digit_{i:04d}.png")
        _drop_shards(out_dir / "shards", split)
        patterns[split] = make_shards(out_dir / "images" / split, out_dir / "shards", prefix=split,
                                      samples_per_shard=math.ceil(len(indices) / streams), seed=seed,
                                      progress=False, streams=streams)
    return patterns
