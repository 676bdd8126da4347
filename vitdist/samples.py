"""One shard's raw samples, checked: the encoded image and its label, or a BadSample that is
skipped and counted by kind; and the stop when too many of them are bad.

Skipping, not failing, because a web-scale shard set always holds a few broken samples; counting
by kind (data/skipped_<kind> curves), because a sudden rise of one kind points at its cause.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .config import DataConfig
from .tars import LINKS, READ_ERROR

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# Why a sample was skipped; the training loop sums them over ranks in this order.
SKIP_KINDS = ("read_error", "no_label", "bad_label", "no_image", "link", "undecodable", "too_small", "too_large")
_MAX_WARNINGS = 20  # logged per kind and worker: the first ones name the broken shards, more would flood the log


class BadSample(ValueError):
    """A sample that is skipped and counted under its `kind`, one of SKIP_KINDS."""

    def __init__(self, kind: str, message: str, count: int = 1):
        super().__init__(message)
        self.kind, self.count = kind, count  # count: the samples it stands for (see _lacking)


def read_sample(sample: dict, num_classes: int) -> tuple[bytes, int]:
    """The encoded image and class index of a raw sample, or BadSample."""
    if READ_ERROR in sample:
        raise BadSample("read_error", f"the rest of the shard is unreadable: {sample[READ_ERROR]}")
    if "cls" not in sample:
        raise _linked(sample, ("cls",)) or _lacking("no_label", ".cls label", sample)
    # A Windows editor's byte-order mark, and whitespace, are allowed; not what int() also reads as
    # a number (1_0 as 10, other scripts' digits), nor more digits than any class index has.
    label = re.fullmatch(rb"(?:\xef\xbb\xbf)?\s*([+-]?[0-9]{1,18})\s*", sample["cls"])
    if label is None:
        raise BadSample("bad_label", f"label {sample['cls'][:20]!r} is not an integer")
    label = int(label[1])
    if not 0 <= label < num_classes:
        raise BadSample("bad_label", f"label {label} outside [0, {num_classes})")
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise _linked(sample, IMAGE_KEYS) or _lacking("no_image", "image (.jpg/.jpeg/.png/.webp)", sample)
    return data, label


def _linked(sample: dict, suffixes: tuple[str, ...]) -> BadSample | None:
    """The BadSample for a file of these suffixes that the tar holds as a link, if it does."""
    links = sample.get(LINKS, {})
    suffix = next((k for k in suffixes if k in links), None)
    if suffix is None:
        return None
    target, hard = links[suffix]
    return BadSample("link", f"its .{suffix} is held in the tar as a {'hard' if hard else 'symbolic'} link to "
                             f"'{target}', not as a file: write shards with tar {'--hard-dereference' if hard else '-h'}, "
                             "or with vitdist make-shards")


def _lacking(kind: str, what: str, sample: dict) -> BadSample:
    """A sample that lacks `what`: the files it has, and, when their names hold a dot, how a key
    with a dot splits. Shards tarred from files named like 'img.v2.jpg' meet it in every sample;
    those named like 'laion.000001.jpg' are one key, 'laion', for the whole shard, which counts
    as the samples its files name (one per name before the suffix), not one."""
    files = sorted(k for k in sample if not k.startswith("__"))
    listed = files if len(files) <= 8 else [*files[:8], f"... {len(files) - 8} more"]
    dotted = next((f for f in files if "." in f), None)
    if dotted is None:
        return BadSample(kind, f"no {what} among {listed}")
    key, count = sample["__key__"], len({f.rsplit(".", 1)[0] for f in files if "." in f})
    merged = f", which makes {count} samples one, skipped as {count}" if count > 1 else ""
    return BadSample(kind, f"no {what} among {listed} (a key ends at the first dot of a file name: '{key}.{dotted}' is "
                           f"key '{key}', file '{dotted}'{merged}; write keys without dots, as vitdist make-shards does)",
                     count)


# The formats read: all that PIL knows but EPS, whose pixels PIL has Ghostscript decode, a program
# run on a shard's bytes (a sample's .jpg may hold anything).
Image.init()
# The shards' own formats first: PIL asks each format in turn whether the bytes are its own, and
# JPEG came 24th (85 us to open one, 43 us so).
_FORMATS = tuple(sorted((name for name in Image.OPEN if name != "EPS"), key=lambda name: name not in ("JPEG", "PNG", "WEBP")))


def open_image(data: bytes) -> Image.Image:
    """The image with only its header read (size, mode, format): no pixels decoded yet; or BadSample.
    data.max_image_pixels judges the size (read_image). PIL's own decompression-bomb check, which
    warns from Image.MAX_IMAGE_PIXELS and refuses from twice that, is left in place for the rest
    of the process: here its warning is silenced and its refusal counted as too_large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as e:
        raise BadSample("too_large", f"{e} (PIL's limit, 2 x PIL.Image.MAX_IMAGE_PIXELS, bounds data.max_image_pixels)") from None
    except Exception as e:
        raise BadSample("undecodable", f"undecodable image: {e}") from None


# 0xFF and a marker's code. Not one: 0xFF 0x00 (a 0xFF byte of entropy-coded data), 0xFF 0xFF (fill
# before a marker), and the markers without a length (TEM, restarts, start of image).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\x01\xd0-\xd8\xff]")


def jpeg_end(data: bytes) -> int | None:
    """The length of a JPEG up to and including its end-of-image marker, or None where it has none
    (cut short). What follows the marker (a camera's padding, a phone's trailer) is no part of the
    image: PIL and libjpeg stop there. Marker segments are skipped by their lengths, so the end of
    an EXIF thumbnail inside one is not taken for the image's."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while marker := _JPEG_MARKER.search(data, pos):
        if marker.group()[1] == 0xD9:
            return marker.end()
        pos = marker.end() + int.from_bytes(data[marker.end() : marker.end() + 2], "big")
    return None


def read_image(sample: dict, cfg: DataConfig, num_classes: int) -> tuple[bytes, Image.Image, int]:
    """The encoded bytes, the opened image (header only) and the class index of a raw sample; or
    BadSample, sizes judged from the header: a decompression bomb never allocates its pixels."""
    data, label = read_sample(sample, num_classes)
    image = open_image(data)
    width, height = image.size
    if min(width, height) < cfg.min_image_side:
        raise BadSample("too_small", f"{width}x{height} image, shorter side below data.min_image_side={cfg.min_image_side}")
    if width * height > cfg.max_image_pixels:
        raise BadSample("too_large", f"{width}x{height} image, more than data.max_image_pixels={cfg.max_image_pixels}")
    return data, image, label


def load_rgb(image: Image.Image) -> Image.Image:
    """The pixels of an opened image, as RGB (CMYK, palette, greyscale, 16-bit converted); or BadSample."""
    try:
        image.load()
        if image.mode.startswith("I"):
            # 16-bit greyscale (PNG): PIL's own conversion clips at 255 instead of scaling 65535 to 255.
            image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).round().clip(0, 255).astype(np.uint8))
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as e:
        raise BadSample("undecodable", f"undecodable image: {e}") from None


def decode(sample: dict, cfg: DataConfig, num_classes: int) -> tuple[Image.Image, int]:
    """The RGB image and class index of a raw sample, or BadSample."""
    _, image, label = read_image(sample, cfg, num_classes)
    return load_rgb(image), label


@dataclass
class Skips:
    """Bad samples met by one worker, by kind, and the warnings logged of them."""
    counts: Counter = field(default_factory=Counter)
    warned: Counter = field(default_factory=Counter)

    def report(self, sample: dict, reason: BadSample) -> None:
        self.counts[reason.kind] += reason.count
        self.warned[reason.kind] += 1
        if self.warned[reason.kind] <= _MAX_WARNINGS:
            what = "the rest of the shard" if READ_ERROR in sample else f"sample '{sample['__key__']}'"
            log.warning("skipped %s in %s: %s [%s]", what, sample["__url__"], reason, reason.kind)


class NoUsableSamples(ValueError):
    """Training shards read to their end held no sample to train on: a data problem, not retried."""


class TooManyBadSamples(RuntimeError):
    """More of the samples read were bad than data.max_skip_frac allows."""


# The skipped fraction is judged from this optimizer step on: by then every stream has given ten
# chunks, so that one corrupt shard met first by one stream does not stop a run on its own.
_JUDGE_SKIPS_FROM_STEP = 10


def too_many_skipped(skipped: Counter, read: int, max_skip_frac: float) -> bool:
    """The one rule for bad samples, during the run and at a loader's timeout alike."""
    return skipped.total() > max_skip_frac * read


def bad_samples(what: str, skipped: Counter, max_skip_frac: float) -> TooManyBadSamples:
    """The error for `skipped` (kind -> count), which broke the rule above; `what` says how many were bad."""
    top = ", ".join(f"{kind} {count}" for kind, count in skipped.most_common(3))
    return TooManyBadSamples(
        f"{what}, more than data.max_skip_frac={max_skip_frac}; most were {top}. The log names the shard and key of "
        "the first ones of each kind: fix or drop those shards, or raise data.max_skip_frac")


def check_skipped(skipped: dict[str, int], step: int, trained: int, cfg: DataConfig) -> None:
    """TooManyBadSamples when more than `data.max_skip_frac` of the samples read in `step` steps
    were skipped, `trained` being the samples trained on. `skipped` (kind -> count) is summed over
    ranks: every rank decides alike."""
    skipped, read = Counter(skipped), sum(skipped.values()) + trained
    if step >= _JUDGE_SKIPS_FROM_STEP and too_many_skipped(skipped, read, cfg.max_skip_frac):
        raise bad_samples(f"{skipped.total() / read:.1%} of the samples read were bad ({skipped.total()} skipped, "
                          f"{trained} trained on)", skipped, cfg.max_skip_frac)
