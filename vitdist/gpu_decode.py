"""`data.decode: gpu`: the JPEGs that loader workers handed over encoded are decoded (nvJPEG on
CUDA, libjpeg-turbo on a CPU device) and cropped on the training device, then merged in sample
order with the crops the workers decoded themselves."""

from __future__ import annotations

import logging
import math

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .data import to_uint8_tensor
from .samples import BadSample, load_rgb, open_image

log = logging.getLogger(__name__)

# Decoded full-size images stay on the device until cropped: decoding this many at a time bounds
# that memory (256 photos of 500x375 take 140 MB) and still gives nvJPEG large batches.
_DECODE_GROUP = 256
_GREY = 128
# Crops resized together: their zero-padded float copies take 4 bytes x 3 channels x this.
_CHUNK_PIXELS = 1 << 24


def to_device(batch: dict, device: torch.device) -> torch.Tensor:
    """A loader batch's images as uint8 NCHW on `device`, in sample order, for either data.decode."""
    decoded = batch["image"].to(device, non_blocking=True)
    if "jpeg" not in batch:
        return decoded
    size = decoded.shape[-1]
    encoded = batch["encoded"]
    images = torch.empty(len(encoded), 3, size, size, dtype=torch.uint8, device=device)
    images.index_copy_(0, (~encoded).nonzero().squeeze(1).to(device), decoded)
    images.index_copy_(0, encoded.nonzero().squeeze(1).to(device), _decode_and_crop(batch, size, device))
    return images


def _decode_and_crop(batch: dict, size: int, device: torch.device) -> torch.Tensor:
    jpegs = encoded_jpegs(batch)
    keys = [key for key, encoded in zip(batch["key"], batch["encoded"].tolist()) if encoded]
    boxes, flips = batch["jpeg_box"].tolist(), batch["jpeg_flip"].tolist()
    crops = torch.empty(len(jpegs), 3, size, size, dtype=torch.uint8, device=device)
    for start in range(0, len(jpegs), _DECODE_GROUP):
        group = slice(start, start + _DECODE_GROUP)
        crops[group] = resize_crops(_decode(jpegs[group], keys[group], device), boxes[group], flips[group], size, device)
    return crops


def encoded_jpegs(batch: dict) -> list[torch.Tensor]:
    """A loader batch's encoded JPEGs, cut out of the one buffer they travel in."""
    ends = batch["jpeg_sizes"].cumsum(0).tolist()
    return [batch["jpeg"][end - n : end] for end, n in zip(ends, batch["jpeg_sizes"].tolist())]


def resize_crops(images: list[torch.Tensor | None], boxes: list[list[int]], flips: list[bool], size: int,
                 device: torch.device) -> torch.Tensor:
    """The CPU path's crops (PIL's BICUBIC resize of each box to size x size, then the flip), for
    uint8 CHW images of any sizes on `device`, as uint8 (N, 3, size, size); None gives grey.
    PIL resamples in two passes, each a matrix of weights per image: every crop of a chunk is
    resized by two batched matmuls, instead of a few small kernels per image."""
    out = torch.full((len(images), 3, size, size), _GREY, dtype=torch.uint8, device=device)
    # What each crop's resampling reads: its box and the filter's reach beyond it (PIL reads there too).
    regions = {i: _region(box[0], box[2], image.shape[2], size) + _region(box[1], box[3], image.shape[1], size)
               for i, (image, box) in enumerate(zip(images, boxes)) if image is not None}
    for vertical_first in (False, True):
        members = [i for i in regions if _vertical_first(images[i], size) == vertical_first]
        # Alike sizes together: less zero padding, fewer wasted multiply-adds.
        members.sort(key=lambda i: (regions[i][1] - regions[i][0]) * (regions[i][3] - regions[i][2]))
        for chunk in _chunks(members, regions):
            resized = _resize_chunk([images[i] for i in chunk], [boxes[i] for i in chunk], [regions[i] for i in chunk],
                                    [flips[i] for i in chunk], size, vertical_first, device)
            out[chunk] = resized.to(torch.uint8)
    return out


def _resize_chunk(images: list[torch.Tensor], boxes: list[list[int]], regions: list[tuple[int, int, int, int]],
                  flips: list[bool], size: int, vertical_first: bool, device: torch.device) -> torch.Tensor:
    """The crops of images resampling in the same pass order, as float (n, 3, size, size)."""
    x0, x1, y0, y1 = torch.tensor(regions, dtype=torch.float64, device=device).unbind(1)
    box = torch.tensor(boxes, dtype=torch.float64, device=device)
    width, height = max(b - a for a, b, _, _ in regions), max(d - c for _, _, c, d in regions)
    across = _pil_weights(box[:, 0], box[:, 2], x0, x1, width, size)
    across = torch.where(torch.tensor(flips, device=device)[:, None, None], across.flip(1), across)
    down = _pil_weights(box[:, 1], box[:, 3], y0, y1, height, size)
    # The first pass runs along the last axis: the pixels go in transposed when it is vertical.
    shape = (len(images), 3, width, height) if vertical_first else (len(images), 3, height, width)
    pixels = torch.zeros(shape, device=device)  # zeros: the weights past each region are 0
    for j, (image, (a, b, c, d)) in enumerate(zip(images, regions)):
        region = image[:, c:d, a:b].transpose(1, 2) if vertical_first else image[:, c:d, a:b]
        pixels[j, :, : region.shape[1], : region.shape[2]] = region
    if vertical_first:
        return _two_passes(pixels, down, across).permute(0, 2, 1, 3)
    return _two_passes(pixels, across, down).permute(0, 2, 3, 1)


def _vertical_first(image: torch.Tensor, size: int) -> bool:
    """Pillow 13's choice of pass order (its rounding between the passes makes the order matter)."""
    shrink_y, shrink_x = image.shape[1] - size, image.shape[2] - size
    return shrink_y > 0 and shrink_y > 2 * shrink_x


def _two_passes(pixels: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Pixels (n, 3, h, w) resampled along w by `first` (n, s, w), rounded to uint8 values as PIL
    does, then along h by `second` (n, s, h): (n, s, 3, s) indexed [along w, channel, along h]."""
    n, _, h, w = pixels.shape
    rows = _round_to_uint8(torch.bmm(first, pixels.view(n, 3 * h, w).transpose(1, 2)))
    resized = _round_to_uint8(torch.bmm(rows.view(n, -1, h), second.transpose(1, 2)))
    return resized.view(n, first.shape[1], 3, second.shape[1])


def _region(lo: int, hi: int, extent: int, size: int) -> tuple[int, int]:
    reach = 2 * max((hi - lo) / size, 1.0)  # the bicubic filter's support, widened when shrinking
    return max(math.floor(lo - reach), 0), min(math.ceil(hi + reach), extent)


def _chunks(members: list[int], regions: dict) -> list[list[int]]:
    """Runs of crops whose zero-padded float copies stay within _CHUNK_PIXELS together."""
    chunks, h, w = [], 0, 0
    for i in members:
        x0, x1, y0, y1 = regions[i]
        h2, w2 = max(h, y1 - y0), max(w, x1 - x0)
        if chunks and (len(chunks[-1]) + 1) * h2 * w2 <= _CHUNK_PIXELS:
            chunks[-1].append(i)
            h, w = h2, w2
        else:
            chunks.append([i])
            h, w = y1 - y0, x1 - x0
    return chunks


def _pil_weights(lo, hi, start, end, extent: int, size: int) -> torch.Tensor:
    """(n, size, extent): PIL's BICUBIC weights (Resample.c's precompute_coeffs) from the input
    pixels start, start + 1, ... (those from `end` on are padding) to the `size` outputs that
    resample lo..hi, one row of weights per output pixel."""
    scale = ((hi - lo) / size)[:, None, None]
    filterscale = scale.clamp(min=1.0)
    center = lo[:, None, None] + (torch.arange(size, device=lo.device)[:, None] + 0.5) * scale
    x = start[:, None, None] + torch.arange(extent, device=lo.device)
    first = (center - 2 * filterscale + 0.5).floor()
    last = torch.minimum((center + 2 * filterscale + 0.5).floor(), end[:, None, None])
    weights = _cubic((x - center + 0.5) / filterscale) * ((x >= first) & (x < last))
    weights = weights / weights.sum(-1, keepdim=True)
    # PIL's 8-bit resampler rounds weights to 22 fractional bits. The same here leaves only float32
    # rounding between the two paths: about 1 pixel in 10^5 one level apart (float64 is exact).
    return ((weights * 2**22).round() / 2**22).float()


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5)."""
    a, x = -0.5, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, 0.0))


def _round_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """PIL's rounding of a pass's result to 0..255: half up, then clipped."""
    return x.add_(0.5).floor_().clamp_(0, 255)


def _decode(jpegs: list[torch.Tensor], keys: list[str], device: torch.device) -> list[torch.Tensor | None]:
    try:
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        # One image the decoder refuses fails its whole batch: find it by decoding one by one.
        return [_decode_one(jpeg, key, device) for jpeg, key in zip(jpegs, keys)]


def _decode_one(jpeg: torch.Tensor, key: str, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:  # what nvJPEG refuses PIL may read, and then the CPU path would have trained on it
        return to_uint8_tensor(load_rgb(open_image(jpeg.numpy().tobytes()))).to(device)
    except BadSample as reason:
        # Broken past its header, which is all the worker read. Dropping it here would shrink the
        # batch, and a rank with fewer micro-batches than the others would hang the step's
        # collectives; a grey image under its label is one sample of noise.
        log.warning("sample '%s' replaced by a grey image: %s", key, reason)
        return None
