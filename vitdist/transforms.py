"""Augmentation and resizing of one image: RandomResizedCrop's box and flip, drawn from a
sample's own rng, and the crops cut and resized as torchvision resizes uint8 tensors. The CPU
path (loader workers) and the device path (vitdist.gpu_decode) draw and resize alike."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import DataConfig
from .samples import BadSample


def sample_crop(rng: random.Random, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, right, bottom), drawn from `rng` (same law as torchvision's)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    # Fall back to a center crop at the nearest allowed aspect ratio.
    in_ratio = width / height
    w, h = (width, round(width / ratio[0])) if in_ratio < ratio[0] else (
        (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def stack_images(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """uint8 (n, 3, size, size); n may be 0 (all of a chunk's samples skipped, a rank's share run out)."""
    return torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as uint8 CHW, channels last in memory as PIL keeps them (what `resize` wants)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def draw_augmentation(rng: random.Random, width: int, height: int, cfg: DataConfig) -> tuple[tuple[int, int, int, int], bool]:
    """The crop box and the flip of one training sample: its whole augmentation draw."""
    box = sample_crop(rng, width, height, cfg.crop_scale, cfg.crop_ratio)
    return box, rng.random() < cfg.hflip


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A uint8 CHW image resized as torchvision resizes tensors: bicubic, antialiased, computed on
    uint8 with integer weights (vitdist.gpu_decode reproduces them). Several times faster than PIL's
    resize on a CPU: torch vectorizes it for channels-last uint8 images."""
    batch = image[None].contiguous(memory_format=torch.channels_last)
    return F.interpolate(batch, size=(height, width), mode="bicubic", antialias=True)[0]


def reduce_jpeg(image: Image.Image, boxes: list[tuple[int, int, int, int]], size: int) -> list[tuple[int, int, int, int]]:
    """Has libjpeg decode an opened (not yet loaded) JPEG at 1/2, 1/4 or 1/8 of its size (DCT
    scaling: the high frequencies the resize would average away are never computed), the smallest
    scale at which each crop in `boxes` still has `size` pixels a side; returns the boxes in those
    pixels. Any other image, and crops too small to reduce, are left as they are."""
    scale = min(min(right - left, bottom - top, 8 * size) // size for left, top, right, bottom in boxes)  # 1/8 at most
    if image.format not in ("JPEG", "MPO") or scale < 2:  # MPO: a JPEG with more pictures after the first
        return boxes
    scale = 1 << (scale.bit_length() - 1)  # a power of two
    width, height = image.size
    # PIL takes the largest power of two at most min(width // w, height // h): this one, as width > 2 * scale
    if image.draft("RGB", (width // scale, height // scale)) is None:  # PIL cannot (a JPEG of several tiles)
        return boxes
    # Reduced pixel j covers full pixels [j * scale, (j + 1) * scale): the box's first at the nearest,
    # its size rounded down, which keeps it inside the ceil(width / scale) pixels decoded.
    reduced = []
    for left, top, right, bottom in boxes:
        x, y = round(left / scale), round(top / scale)
        reduced.append((x, y, x + (right - left) // scale, y + (bottom - top) // scale))
    return reduced


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], flip: bool, size: int) -> torch.Tensor:
    """torchvision's resized_crop (the box cut out, then resized as `resize` does), then the flip.
    PIL cuts the box: only its pixels are copied out of the image."""
    crop = resize(to_uint8_tensor(image.crop(box)), size, size)
    return crop.flip(-1) if flip else crop


def eval_transform(image: torch.Tensor, cfg: DataConfig, size: int) -> torch.Tensor:
    """The validation crop as timm's eval transform makes it: the shorter side resized to
    floor(size / crop_pct), the longer in proportion (truncated, as torchvision's Resize does),
    then the centre cut out (offsets rounded, as its CenterCrop does). An export names crop_pct
    for timm, whose figures then match vitdist's up to the resampler (timm resizes with PIL).
    BadSample (too_large) where the resized image would hold more than data.max_image_pixels: a
    thin strip (8x500000) passes that bound as decoded, but resized whole it would not (12 GB)."""
    _, height, width = image.shape
    short = math.floor(size / cfg.val_crop_frac)
    w, h = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    if w * h > cfg.max_image_pixels:
        raise BadSample("too_large", f"{width}x{height} image, resized to {w}x{h} for the validation crop: more than "
                                     f"data.max_image_pixels={cfg.max_image_pixels}")
    left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
    return resize(image, h, w)[:, top : top + size, left : left + size]
