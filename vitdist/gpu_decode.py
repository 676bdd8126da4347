"""`data.decode: gpu`: the JPEGs that loader workers handed over encoded are decoded (nvJPEG on
CUDA, libjpeg-turbo on a CPU device) and cropped on the training device, then merged in sample
order with the crops the workers decoded themselves."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Generator

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


class DeviceBatches:
    """Loader batches with their images and labels on the device, prepared by a background thread
    `ahead` batches before the step asks, on a CUDA stream of its own: the host work of decoding
    (launches, the per-image crop loop) and its kernels overlap the training step instead of
    adding to it. On a CPU device the thread still overlaps it with the step's Python."""

    def __init__(self, batches: Generator[dict], device: torch.device, ahead: int = 2):
        self.batches, self.device = batches, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready: queue.Queue = queue.Queue(maxsize=ahead)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(batches,), daemon=True, name="device-batches")
        self.thread.start()

    def __enter__(self) -> DeviceBatches:
        return self

    def __exit__(self, *exc) -> None:
        """Stop the thread, then close the loader's generator, which shuts its workers down now.
        Left to interpreter exit (after an error, when a reference cycle keeps them), the workers
        deadlock it: they ignore the SIGTERM that multiprocessing stops them with (see data.py)."""
        self.stopped.set()
        with contextlib.suppress(queue.Empty):
            while True:  # unblock a waiting put; the thread then sees `stopped`
                self.ready.get_nowait()
        self.thread.join()
        self.batches.close()

    def _fill(self, batches: Generator[dict]) -> None:
        try:
            on_stream = torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext()
            with on_stream:
                for batch in batches:
                    if self.stopped.is_set():
                        return
                    batch["image"] = to_device(batch, self.device)
                    batch["label"] = batch["label"].to(self.device, non_blocking=True)
                    done = self.stream.record_event() if self.stream else None
                    self.ready.put((batch, done))
        except BaseException as error:  # the step re-raises it: a loader failure must stop training
            self.ready.put((error, None))

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> dict:
        batch, done = self.ready.get()
        if isinstance(batch, BaseException):
            raise batch
        if done is not None:
            step_stream = torch.cuda.current_stream(self.device)
            step_stream.wait_event(done)
            for name in ("image", "label"):  # made on the side stream, freed after the step's use
                batch[name].record_stream(step_stream)
        return batch


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
