"""`data.decode: gpu`: the JPEGs that loader workers handed over encoded are decoded (nvJPEG on
CUDA, libjpeg-turbo on a CPU device) and cropped on the training device, then merged in sample
order with the crops the workers decoded themselves."""

from __future__ import annotations

import bisect

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .transforms import to_uint8_tensor
from .samples import BadSample, Skips, load_rgb, open_image

# Decoded full-size images stay on the device until cropped: decoding at most this many pixels at
# a time (192 MB as RGB) bounds that memory whatever the images' sizes, and still gives nvJPEG
# large batches (hundreds of 500x375 photos).
_DECODE_PIXELS = 1 << 26
_DECODE_IMAGES = 256
_GREY = 128
# Crops resized together: their zero-padded float copies take 4 bytes x 3 channels x this.
_CHUNK_PIXELS = 1 << 24


def to_device(batch: dict, device: torch.device, skips: Skips | None = None) -> torch.Tensor:
    """A loader batch's images as uint8 NCHW on `device`, in sample order, for either data.decode.
    A JPEG broken past its header, which only this full decode finds, is reported to `skips` (a
    fresh one if None) and trained on as a copy of another sample of the batch, crop and label
    (batch["label"] is replaced): dropping it would leave ranks with unequal micro-batches, which
    hangs the step's collectives."""
    decoded = batch["image"].to(device, non_blocking=True)
    if "jpeg" not in batch:
        return decoded
    size = decoded.shape[-1]
    encoded = batch["encoded"]
    images = torch.empty(len(encoded), 3, size, size, dtype=torch.uint8, device=device)
    images.index_copy_(0, _host_to_device((~encoded).nonzero().squeeze(1), device), decoded)
    crops, broken = _decode_and_crop(batch, size, device, skips or Skips())
    positions = encoded.nonzero().squeeze(1)
    images.index_copy_(0, _host_to_device(positions, device), crops)
    if stand_ins := _stand_ins(positions[broken].tolist(), len(encoded)):
        replaced, sources = map(list, zip(*stand_ins.items()))
        images[_host_to_device(replaced, device)] = images[_host_to_device(sources, device)]
        batch["label"] = batch["label"].clone()
        batch["label"][replaced] = batch["label"][sources]
    return images


def _stand_ins(broken: list[int], n: int) -> dict[int, int]:
    """Of a batch of `n` samples, each broken one's stand-in: the good sample nearest before it, or
    after it where none is before (the same for a sample's data.aug_repeats copies, side by side).
    Empty if all are broken: they stay grey, as no image is left to copy."""
    good = sorted(set(range(n)) - set(broken))
    if not good:
        return {}
    return {i: good[max(bisect.bisect_left(good, i) - 1, 0)] for i in broken}


def _host_to_device(values: torch.Tensor | list, device: torch.device,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Small host data (indices, sizes) on the device without waiting: a copy from pageable memory
    makes this thread wait until the device has run all the work queued before it, so every such
    copy would stall the preparation of the next chunk until the GPU has finished this one."""
    tensor = torch.as_tensor(values, dtype=dtype)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


def _decode_and_crop(batch: dict, size: int, device: torch.device,
                     skips: Skips) -> tuple[torch.Tensor, list[int]]:
    """The encoded JPEGs' crops, and which of them (by index among the JPEGs) no decoder read: grey."""
    jpegs = encoded_jpegs(batch)
    samples = [{"__key__": key, "__url__": url}
               for key, url, encoded in zip(batch["key"], batch["url"], batch["encoded"].tolist()) if encoded]
    boxes, flips = batch["jpeg_box"].tolist(), batch["jpeg_flip"].tolist()
    crops = torch.empty(len(jpegs), 3, size, size, dtype=torch.uint8, device=device)
    broken = []
    image = None  # the crop before's: a group may begin with a copy
    for group in decode_groups(batch["jpeg_pixels"].tolist()):
        # data.aug_repeats puts a sample's copies side by side, its JPEG with each: decoded once
        firsts = [i for i in range(group.start, group.stop)
                  if i == 0 or samples[i] != samples[i - 1] or not torch.equal(jpegs[i], jpegs[i - 1])]
        decoded = dict(zip(firsts, _decode([jpegs[i] for i in firsts], [samples[i] for i in firsts], device, skips)))
        images = []
        for i in range(group.start, group.stop):
            image = decoded[i] if i in decoded else image  # a copy: its first's image
            images.append(image)
            if image is None:
                broken.append(i)
        crops[group] = resize_crops(images, boxes[group], flips[group], size, device)
    return crops, broken


def decode_groups(pixels: list[int]) -> list[slice]:
    """The images, of `pixels` each, in runs decoded together: in order, each run of at most
    _DECODE_IMAGES images and _DECODE_PIXELS pixels, but for an image larger than that on its own."""
    groups, total = [], 0
    for i, n in enumerate(pixels):
        if groups and total + n <= _DECODE_PIXELS and i - groups[-1].start < _DECODE_IMAGES:
            groups[-1], total = slice(groups[-1].start, i + 1), total + n
        else:
            groups.append(slice(i, i + 1))
            total = n
    return groups


def encoded_jpegs(batch: dict) -> list[torch.Tensor]:
    """A loader batch's encoded JPEGs (up to their end-of-image markers: data.device_jpeg), cut out
    of the one buffer they travel in."""
    ends = batch["jpeg_sizes"].cumsum(0).tolist()
    return [batch["jpeg"][end - n : end] for end, n in zip(ends, batch["jpeg_sizes"].tolist())]


def resize_crops(images: list[torch.Tensor | None], boxes: list[list[int]], flips: list[bool], size: int,
                 device: torch.device) -> torch.Tensor:
    """The CPU path's crops (transforms.resized_crop: each box cut out, resized as torch resizes uint8
    images, then flipped), for uint8 CHW images of any sizes on `device`, as uint8 (N, 3, size, size);
    None gives grey. That resize is two passes, each a matrix of integer weights per crop: every crop
    of a chunk is resized by the same few batched matmuls, instead of a few small kernels per crop."""
    out = torch.full((len(images), 3, size, size), _GREY, dtype=torch.uint8, device=device)
    members = [i for i, image in enumerate(images) if image is not None]
    # Alike sizes together: less zero padding, fewer wasted multiply-adds.
    members.sort(key=lambda i: (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1]))
    for chunk in _chunks(members, boxes):
        resized = _resize_chunk([images[i] for i in chunk], [boxes[i] for i in chunk], [flips[i] for i in chunk],
                                size, device)
        out.index_copy_(0, _host_to_device(chunk, device), resized)
    return out


def _resize_chunk(images: list[torch.Tensor], boxes: list[list[int]], flips: list[bool], size: int,
                  device: torch.device) -> torch.Tensor:
    """uint8 (n, 3, size, size)."""
    widths = [right - left for left, _, right, _ in boxes]
    heights = [bottom - top for _, top, _, bottom in boxes]
    width, height = max(widths), max(heights)
    across, across_precision = _torch_weights(_host_to_device(widths, device, torch.float64), width, size)
    across = torch.where(_host_to_device(flips, device)[:, None, None], across.flip(1), across)
    down, down_precision = _torch_weights(_host_to_device(heights, device, torch.float64), height, size)
    n = len(images)
    pixels = torch.zeros(n, 3, height, width, device=device)  # the weights past each crop are 0
    for j, (image, (left, top, right, bottom)) in enumerate(zip(images, boxes)):
        pixels[j, :, : bottom - top, : right - left] = image[:, top:bottom, left:right]
    # Along the width first, rounded to uint8 values in between, as torch does: (n, size, 3 * height)
    # indexed [x, channel, y], then (n, size * 3, size) indexed [x, channel, y].
    columns = pixels.view(n, 3 * height, width).transpose(1, 2)
    rows = _rounded(*(torch.bmm(half, columns) for half in _halves(across)), across_precision)
    rows = rows.view(n, 3 * size, height)
    resized = _rounded(*(torch.bmm(rows, half.transpose(1, 2)) for half in _halves(down)), down_precision)
    return resized.view(n, size, 3, size).permute(0, 2, 3, 1).to(torch.uint8)


def _halves(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer weights under 2^15 in magnitude as high and low 8 bits, float32. A pass's sums reach
    2^26, past float32's exact integers (2^24); each half's stay far below, and every half weight
    and pixel value fits 8 bits, exact even where float32 matmuls run as TF32. So the sums are
    exact on any GPU without float64 (slow on most GPUs but the largest), for crops up to about 60
    times the output size (13,000 pixels at 224: 250 taps of at most 255 x 255)."""
    high = torch.div(weights, 256, rounding_mode="floor")
    return high.float(), (weights - 256 * high).float()


def _rounded(high_sums: torch.Tensor, low_sums: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """A pass's result as torch's uint8 resize rounds it: the halves' sums joined (in int64), half a
    unit added, shifted right by the crop's `precision` and saturated to 0..255; float32."""
    shift = precision[:, None, None]
    sums = high_sums.long() * 256 + low_sums.long()
    return ((sums + (1 << (shift - 1))) >> shift).clamp_(0, 255).float()


def _chunks(members: list[int], boxes: list[list[int]]) -> list[list[int]]:
    """Runs of crops whose zero-padded float copies stay within _CHUNK_PIXELS together."""
    chunks, h, w = [], 0, 0
    for i in members:
        left, top, right, bottom = boxes[i]
        h2, w2 = max(h, bottom - top), max(w, right - left)
        if chunks and (len(chunks[-1]) + 1) * h2 * w2 <= _CHUNK_PIXELS:
            chunks[-1].append(i)
            h, w = h2, w2
        else:
            chunks.append([i])
            h, w = bottom - top, right - left
    return chunks


def _torch_weights(lengths: torch.Tensor, extent: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's uint8 antialiased bicubic weights (UpSampleKernel.cpp's
    _compute_index_ranges_int16_weights) from `lengths` (n,) input pixels to `size` outputs, as
    (n, size, extent) integers (float64), zero past each length, and their precision in bits, (n,)."""
    scale = (lengths / size)[:, None, None]
    support = 2 * scale.clamp(min=1.0)  # the filter widens when shrinking: that is the antialiasing
    center = scale * (torch.arange(size, dtype=torch.float64, device=lengths.device)[:, None] + 0.5)
    x = torch.arange(extent, dtype=torch.float64, device=lengths.device)
    first = (center - support + 0.5).trunc().clamp(min=0)
    last = torch.minimum((center + support + 0.5).trunc(), lengths[:, None, None])
    last = torch.minimum(last, first + support.ceil() * 2 + 1)
    weights = _cubic((x - center + 0.5) * (1 / scale.clamp(min=1.0))) * ((x >= first) & (x < last))
    weights = weights / weights.sum(-1, keepdim=True)
    # The precision: the most bits (at most 22) that keep twice the largest weight within int16.
    bits = torch.arange(22, dtype=torch.float64, device=lengths.device)
    precision = ((0.5 + weights.amax((1, 2))[:, None] * 2 ** (bits + 1)).floor() < 2**15).sum(1)
    scaled = weights * (2.0 ** precision)[:, None, None]
    return scaled.sign() * (scaled.abs() + 0.5).floor(), precision


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """The bicubic kernel (a = -0.5), in torch's order of operations: the weights are rounded to
    integers, and a last-bit difference could move one."""
    a, x = -0.5, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, 0.0))


def _decode(jpegs: list[torch.Tensor], samples: list[dict], device: torch.device,
            skips: Skips) -> list[torch.Tensor | None]:
    try:
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        # One image the decoder refuses fails its whole batch: find it by decoding one by one.
        return [_decode_one(jpeg, sample, device, skips) for jpeg, sample in zip(jpegs, samples)]


def _decode_one(jpeg: torch.Tensor, sample: dict, device: torch.device, skips: Skips) -> torch.Tensor | None:
    try:
        return decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:  # what nvJPEG refuses PIL may read, and then the CPU path would have trained on it
        return to_uint8_tensor(load_rgb(open_image(jpeg.numpy().tobytes()))).to(device)
    except BadSample as reason:
        # Broken past its header, which is all the worker read. Counted as skipped, so that
        # data.max_skip_frac sees corrupt shards on either path.
        skips.report(sample, BadSample(reason.kind, f"{reason}; trained on as a copy of another sample of its batch (grey if none is left)",
                                       reason.count))
        return None
