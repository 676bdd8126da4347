"""`data.decode: gpu`: the JPEGs that loader workers handed over encoded are decoded (nvJPEG on
CUDA, libjpeg-turbo on a CPU device) and cropped on the training device, then merged in sample
order with the crops the workers decoded themselves."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from .data import to_uint8_tensor
from .samples import BadSample, load_rgb, open_image

log = logging.getLogger(__name__)

# Decoded full-size images stay on the device until cropped: decoding this many at a time bounds
# that memory (256 photos of 500x375 take 140 MB) and still gives nvJPEG large batches.
_DECODE_GROUP = 256
_GREY = 128


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
    sizes = batch["jpeg_sizes"].tolist()
    ends = batch["jpeg_sizes"].cumsum(0).tolist()
    jpegs = [batch["jpeg"][end - n : end] for end, n in zip(ends, sizes)]
    keys = [key for key, encoded in zip(batch["key"], batch["encoded"].tolist()) if encoded]
    boxes = batch["jpeg_box"].tolist()
    crops = torch.empty(len(jpegs), 3, size, size, dtype=torch.uint8, device=device)
    for start in range(0, len(jpegs), _DECODE_GROUP):
        end = min(start + _DECODE_GROUP, len(jpegs))
        # Per image only what must be (each crop has its own size); rounding and the cast to
        # uint8 once per group: fewer kernel launches on the training process's thread.
        resized = torch.full((end - start, 3, size, size), float(_GREY), device=device)
        for j, image in enumerate(_decode(jpegs[start:end], keys[start:end], device)):
            if image is not None:
                resized[j] = resize_box(image, boxes[start + j], size)
        crops[start:end] = resized.round_().clamp_(0, 255)
    flipped = batch["jpeg_flip"].nonzero().squeeze(1).to(device)
    crops[flipped] = crops[flipped].flip(-1)
    return crops


def resize_box(image: torch.Tensor, box: list[int], size: int) -> torch.Tensor:
    """The CPU path's PIL BICUBIC resize of `box` to size x size (as float), on the device: torch's
    antialiased bicubic uses PIL's kernel (a = -0.5). PIL's filter also reads a few pixels beyond
    the box, this one only inside it: they differ at the crop's edges by a little."""
    left, top, right, bottom = box
    crop = image[None, :, top:bottom, left:right].float()
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]


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
