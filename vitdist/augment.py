"""The augmentations of DeiT's recipe beyond the crop and flip: timm's RandAugment on each training
crop (in the loader workers) and random erasing of the normalised batch (on the training device).
Both draw from seeds that a resume reproduces: the sample's own, the step's."""

from __future__ import annotations

import math
import random
import re
import threading

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment

from .config import ConfigError, DataConfig
from .transforms import to_uint8_tensor


class _SampleRandom(threading.local):
    """Python's `random` as timm's auto_augment module sees it: in a thread applying RandAugment to a
    sample, a generator of that sample's seed; elsewhere Python's global one, as timm has it. Not the
    global one seeded: with data.num_workers=0 the ops run in DeviceBatches' thread beside the
    training, and torch.compile restores the global generator's state after each compilation, in
    the middle of a sample's draws."""

    generator = random

    def __getattr__(self, name):
        return getattr(self.generator, name)


_sample_random = auto_augment.random = _SampleRandom()


class RandAugment:
    """timm's RandAugment, from its config string (`data.rand_augment`), with timm's hyperparameters
    for the image size and mean (as timm's create_transform sets them). timm draws the ops from
    numpy's global generator and their magnitudes from Python's: here the ops come from a generator
    of the sample's seed, and the magnitudes from another of the same seed, so that a sample gets
    the same ops whichever worker reads it, and after a resume."""

    def __init__(self, cfg: DataConfig, img_size: int):
        hparams = {"translate_const": int(img_size * 0.45), "interpolation": Image.BICUBIC,
                   "img_mean": tuple(min(255, round(255 * x)) for x in cfg.mean)}
        # timm passes over a section without a number ("rand-mfoo" is rand-m10), a "t" section
        # other than its op sets' names, and every "t" section after the first: a typo would go unseen.
        parts = cfg.rand_augment.split("-")[1:]
        op_sets = [i for i, part in enumerate(parts) if part.startswith("t")]
        unread = [part for i, part in enumerate(parts) if (
            i != op_sets[0] or part[1:] not in ("weights", "3aw", "3a") if part.startswith("t")
            else not re.search(r"\d", part))]
        try:
            if unread:
                raise ValueError(f"sections timm would pass over: {', '.join(map(repr, unread))}")
            self.transform = auto_augment.rand_augment_transform(cfg.rand_augment, hparams)
            _check_as_written(self.transform)
        except (AssertionError, ValueError, KeyError, IndexError) as e:  # timm asserts on what it cannot read
            detail = f" ({e})" if str(e) else ""
            raise ConfigError(f"data.rand_augment='{cfg.rand_augment}' is not a RandAugment config string timm reads"
                              f"{detail}: sections separated by '-', the first 'rand', e.g. rand-m9-mstd0.5-inc1 "
                              "(DeiT's)") from None
        for op in self.transform.ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize

    def __call__(self, crop: torch.Tensor, seed: int) -> torch.Tensor:
        """A uint8 CHW crop, augmented by the ops `seed` draws."""
        ra = self.transform
        ops = np.random.default_rng(seed).choice(ra.ops, ra.num_layers, replace=ra.choice_weights is None,
                                                 p=ra.choice_weights)
        image = Image.fromarray(crop.permute(1, 2, 0).numpy())
        _sample_random.generator = random.Random(seed)
        try:
            for op in ops:
                image = op(image)
        finally:
            _sample_random.generator = random
        return to_uint8_tensor(image)


def _check_as_written(ra: auto_augment.RandAugment) -> None:
    """ValueError for what timm reads but would not do as written: a magnitude above its top (10
    without mmax), which it clamps to the top; a probability above 1; more ops per image than the
    weighted op set holds, drawn without replacement, which fails in the loader workers mid-run."""
    op = ra.ops[0]
    top = op.magnitude_max or 10  # timm's _LEVEL_DENOM
    if op.magnitude > top:
        raise ValueError(f"magnitude m{op.magnitude:g} above {top:g}, which timm clamps it to: add mmax{op.magnitude:g} "
                         "to allow it")
    if not 0 <= op.prob <= 1:  # timm applies every op at p2 as at p1
        raise ValueError(f"p{op.prob:g}: the probability of applying each op, from 0 to 1")
    if ra.choice_weights is not None and ra.num_layers > len(ra.ops):
        raise ValueError(f"n{ra.num_layers} ops per image, drawn without repeats from the {len(ra.ops)} of the "
                         "weighted op set (tweights)")


def _posterize(image: Image.Image, bits: int, **kwargs) -> Image.Image:
    """timm's posterize, but for 0 bits: its increasing posterize keeps 0 bits at magnitude 10
    (DeiT's m9 plus its noise), which Pillow 13 refuses; Pillow used to give what keeping no bit
    gives, a black image."""
    return Image.new(image.mode, image.size) if bits <= 0 else auto_augment.posterize(image, bits, **kwargs)


def random_erase(images: torch.Tensor, probability: float, area: tuple[float, float] = (0.02, 1 / 3),
                 aspect: tuple[float, float] = (0.3, 1 / 0.3), attempts: int = 10) -> torch.Tensor:
    """timm's RandomErasing (mode 'pixel', one rectangle) of a normalised NCHW batch: each image, with
    `probability`, gets a rectangle of `area` x its area and `aspect` (log-uniform) filled with
    normal noise; the first of `attempts` draws that fits is taken, none if none fits. The whole
    batch at once from torch's generator (seeded per step), not timm's per-image Python loop."""
    n, _, height, width = images.shape
    device = images.device
    target = torch.empty(n, attempts, device=device).uniform_(*area) * (height * width)
    ratio = torch.empty(n, attempts, device=device).uniform_(math.log(aspect[0]), math.log(aspect[1])).exp()
    h, w = (target * ratio).sqrt().round().long(), (target / ratio).sqrt().round().long()
    fits = (h < height) & (w < width)
    first = fits.long().argmax(1, keepdim=True)  # the first attempt that fits (0 if none does)
    h, w = h.gather(1, first), w.gather(1, first)
    erased = (torch.rand(n, 1, device=device) < probability) & fits.any(1, keepdim=True)
    top = (torch.rand(n, 1, device=device) * (height - h + 1)).long()
    left = (torch.rand(n, 1, device=device) * (width - w + 1)).long()
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    inside_rows = (rows >= top) & (rows < top + h) & erased  # (n, height)
    inside_cols = (cols >= left) & (cols < left + w)  # (n, width)
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]
    return torch.where(mask, torch.randn_like(images), images)
