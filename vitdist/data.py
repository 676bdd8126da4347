"""WebDataset shards in, uint8 image batches out.

Training samples come from `data.streams` virtual streams (vitdist.streams: the data order, the
same on any hardware); each optimizer step takes `global_batch_size / streams` samples from every
stream. Ranks and loader workers own whole streams, so changing the hardware only changes who
reads a stream, not what it yields.

Images leave the workers as uint8 (a quarter of the bytes of float32); normalisation happens
on the device. With `data.decode: gpu` the workers leave JPEGs encoded, with the crop box and flip
already drawn, and the training device decodes and crops them (vitdist.gpu_decode): the same
samples, boxes and flips as on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .augment import RandAugment
from .config import DataConfig
from .samples import BadSample, Skips, decode, jpeg_end, load_rgb, read_image
from .tars import read_samples
from .shard_list import expand_urls, train_shard_urls
from .streams import Stream
from .transforms import draw_augmentation, eval_transform, reduce_jpeg, resized_crop, stack_images, to_uint8_tensor
from .workers import Reads, data_loader, watched

log = logging.getLogger(__name__)


def device_jpeg(image: Image.Image, data: bytes) -> bytes | None:
    """The bytes the device decoder gets of this image, or None where it stays on the CPU path:
    colour (YCbCr) JPEGs only. Greyscale and CMYK are rare and not every nvJPEG build handles them;
    a JPEG without its end-of-image marker is truncated, and the worker's PIL refuses it as
    BadSample just as with decode: cpu. Bytes after the marker (a camera's padding, a phone's
    trailer, which can hold a video, an Ultra HDR photo's gain map, a JPEG that ends with the marker
    too) are cut off here: libjpeg ignores them, nvJPEG's handling of them is not documented, and
    they need not travel. Every JPEG is scanned for its marker (about 60 us for 80 KB, on one core).
    PIL names a JPEG with a multi-picture segment (an Ultra HDR photo, a camera's stereo pair) MPO:
    its first picture, the one PIL decodes, is a JPEG like any other."""
    if image.format not in ("JPEG", "MPO") or image.mode != "RGB":
        return None
    return data[:end] if (end := jpeg_end(data)) else None


def _worker_slot() -> tuple[int, int]:
    """This loader worker's index and the number of workers (0 of 1 in the main process)."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def decodes_on_device(cfg: DataConfig) -> bool:
    """`data.decode` resolved; auto follows distributed.init, which trains on CUDA whenever it is there,
    unless data.rand_augment needs the images decoded in the workers."""
    return cfg.decode == "gpu" or (cfg.decode == "auto" and torch.cuda.is_available() and not cfg.rand_augment)


class TrainChunks(IterableDataset):
    """In each worker: round-robin over the worker's streams, one chunk (a collated batch of
    `global_batch / streams` samples) per stream per optimizer step.

    A chunk's "image" holds the crops decoded here. With `on_device`, the JPEGs the device can
    decode stay encoded instead, all of a chunk's bytes in one tensor ("jpeg", cut by
    "jpeg_sizes"): one shared-memory buffer per chunk rather than one per image. "jpeg_box" and
    "jpeg_flip" are their augmentation, "jpeg_pixels" their full size (from the header: what
    decoding them takes), "encoded" marks them in sample order. "key" and "url" name every sample.
    Each sample read is also counted in `reads`, which the loader's waiting thread looks at.
    """

    def __init__(self, urls, cfg: DataConfig, img_size: int, num_classes: int, rank: int, world_size: int,
                 chunk_size: int, reads: Reads, positions: dict[int, tuple[int, int, int]] | None = None,
                 on_device: bool = False):
        self.urls, self.cfg, self.img_size, self.num_classes = urls, cfg, img_size, num_classes
        self.rank, self.world_size, self.chunk_size, self.reads = rank, world_size, chunk_size, reads
        self.positions, self.on_device = dict(positions or {}), on_device  # where each stream starts
        self.rand_augment = RandAugment(cfg, img_size) if cfg.rand_augment else None

    def __iter__(self):
        worker, num_workers = _worker_slot()
        per_rank = self.cfg.streams // self.world_size
        ids = [self.rank * per_rank + i for i in range(worker, per_rank, num_workers)]
        streams = [Stream(self.urls, s, self.cfg.streams, self.cfg, self.positions.get(s, (0, 0, 0))) for s in ids]
        skips = Skips()
        while True:
            for stream in streams:
                yield self._chunk(stream, skips)

    def _chunk(self, stream: Stream, skips: Skips) -> dict:
        images, labels, keys, urls, encoded, skipped_before = [], [], [], [], [], skips.counts.copy()
        jpegs, boxes, flips, pixels = [], [], [], []
        while len(labels) < self.chunk_size:
            sample, rngs = stream.next_raw(self.cfg.aug_repeats)
            try:
                data, image, label = read_image(sample, self.cfg, self.num_classes)
                drawn = [draw_augmentation(rng, image.width, image.height, self.cfg) for rng in rngs]
                jpeg = device_jpeg(image, data) if self.on_device else None
                if jpeg is not None:
                    jpegs += [jpeg] * len(drawn)
                    boxes += [box for box, _ in drawn]
                    flips += [flip for _, flip in drawn]
                    pixels += [image.width * image.height] * len(drawn)
                else:
                    crop_boxes = [box for box, _ in drawn]
                    if self.cfg.jpeg_reduce:
                        crop_boxes = reduce_jpeg(image, crop_boxes, self.img_size)
                    rgb = load_rgb(image)
                    for box, (_, flip), rng in zip(crop_boxes, drawn, rngs):
                        crop = resized_crop(rgb, box, flip, self.img_size)
                        images.append(self.rand_augment(crop, rng.getrandbits(64)) if self.rand_augment else crop)
            except BadSample as reason:
                skips.report(sample, reason)
                stream.judged(reason.kind, reason.count)
                self.reads.count(reason.kind, reason.count)
                continue
            stream.judged(None)
            self.reads.count(None)
            labels += [label] * len(rngs)
            keys += [sample["__key__"]] * len(rngs)
            urls += [sample["__url__"]] * len(rngs)
            encoded += [jpeg is not None] * len(rngs)
        # "skipped" as a plain dict: the loader's default_convert copies a Counter, then update()s the
        # copy with its own items, which adds every count twice.
        chunk = {"image": stack_images(images, self.img_size),
                 "label": torch.tensor(labels), "key": keys, "url": urls,
                 "stream": stream.stream_id, "position": stream.resume_point(), "skipped": dict(skips.counts - skipped_before)}
        if self.on_device:
            chunk.update(jpeg=torch.from_numpy(np.frombuffer(b"".join(jpegs), dtype=np.uint8).copy()),
                         jpeg_sizes=torch.tensor([len(j) for j in jpegs], dtype=torch.int64),
                         jpeg_box=torch.tensor(boxes, dtype=torch.int64).view(-1, 4),
                         jpeg_flip=torch.tensor(flips, dtype=torch.bool),
                         jpeg_pixels=torch.tensor(pixels, dtype=torch.int64), encoded=torch.tensor(encoded))
        return chunk


class TrainLoader:
    """Yields, per optimizer step, this rank's share of the global batch: one chunk from each of
    its streams, in stream order. `positions` (stream -> position) is what a checkpoint saves.
    A worker that dies stops the run within seconds, and one that delivers nothing for
    `timeout_s` (a stalled `pipe:` read, a hung filesystem) stops it as a silent peer would
    (vitdist.workers). With `pin_memory` the chunks are joined straight into
    pinned memory: one copy on the host, and the copy to the GPU is asynchronous (the loader's own
    pinning would copy each chunk once more, and the batch joined from them would be pageable)."""

    def __init__(self, cfg: DataConfig, img_size: int, num_classes: int, global_batch_size: int,
                 rank: int, world_size: int, positions: dict | None = None, pin_memory: bool = False,
                 timeout_s: float = 600):
        urls = train_shard_urls(cfg, world_size)
        if rank == 0 and len(urls) % cfg.streams:
            log.warning("%d training shards for data.streams=%d, not a multiple: the streams hold unequal numbers of "
                        "shards, so they see unequal amounts per epoch, and some samples repeat before others are seen "
                        "(vitdist make-shards --streams %d writes them for the streams)",
                        len(urls), cfg.streams, cfg.streams)
        self.per_rank = cfg.streams // world_size
        mine = range(rank * self.per_rank, (rank + 1) * self.per_rank)
        self.positions = {int(k): tuple(v) for k, v in (positions or {}).items() if int(k) in mine}
        self.reads = Reads(cfg.num_workers, cfg.max_skip_frac)
        chunks = TrainChunks(urls, cfg, img_size, num_classes, rank, world_size, global_batch_size // cfg.streams,
                             self.reads, self.positions, decodes_on_device(cfg))
        # The loader's round-robin over workers meets the workers' round-robin over their
        # streams, so the first `per_rank` items are exactly one chunk of every stream.
        workers = max(1, cfg.num_workers)
        self.pin_memory, self.timeout_s = pin_memory, timeout_s
        self.loader = data_loader(chunks, cfg.num_workers, timeout_s,
                                  prefetch_factor=cfg.prefetch_steps * self.per_rank // workers if cfg.num_workers else None)

    def __iter__(self) -> Iterator[dict]:
        with contextlib.closing(watched(self.loader, self.timeout_s, "training", self.reads)) as chunks:
            while True:
                step = sorted((next(chunks) for _ in range(self.per_rank)), key=lambda c: c["stream"])
                for c in step:
                    self.positions[c["stream"]] = c["position"]
                # The positions after this batch travel with it: a batch may be consumed well after it
                # was read (DeviceBatches reads ahead), and a checkpoint must record what was trained on.
                batch = {name: [x for c in step for x in c[name]] for name in ("key", "url")}
                batch.update(positions=dict(self.positions), skipped=sum((Counter(c["skipped"]) for c in step), Counter()))
                batch.update({name: self._join([c[name] for c in step]) for name, value in step[0].items()
                              if isinstance(value, torch.Tensor)})
                yield batch

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        shape = (sum(len(part) for part in parts), *parts[0].shape[1:])
        return torch.cat(parts, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=self.pin_memory))


class EvalSamples(IterableDataset):
    """Every validation sample exactly once over all ranks and workers (whole shards per slot when
    there are enough of them, else each shard is read by the slots that share it, each keeping every
    n-th sample), in batches of up to `batch_size`. Each batch counts the bad samples skipped since
    the one before, the last batch those after it (a batch of no images if need be): evaluation
    reports them."""

    def __init__(self, urls, cfg: DataConfig, img_size: int, num_classes: int, rank: int, world_size: int,
                 batch_size: int):
        self.urls, self.cfg, self.img_size, self.num_classes = urls, cfg, img_size, num_classes
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def __iter__(self):
        worker, num_workers = _worker_slot()
        slots, slot = self.world_size * num_workers, self.rank * num_workers + worker
        # With fewer shards than slots, slot s reads shard s % shards only, not every shard: each
        # shard is read ceil(slots / shards) times, where 512 slots read 64 shards 512 times over.
        shards = len(self.urls)
        urls = self.urls[slot::slots] if shards >= slots else [self.urls[slot % shards]]
        sharing, nth = len(range(slot % shards, slots, shards)), slot // shards
        skips = Skips()
        batch, skipped = [], 0
        for url in urls:
            for index, sample in enumerate(read_samples(url)):
                if index % sharing != nth:
                    continue
                try:
                    image, label = decode(sample, self.cfg, self.num_classes)
                    crop = eval_transform(to_uint8_tensor(image), self.cfg, self.img_size)
                except BadSample as reason:
                    skips.report(sample, reason)
                    skipped += reason.count
                    continue
                batch.append((crop, label, sample["__key__"]))
                if len(batch) == self.batch_size:
                    yield self._collate(batch, skipped)
                    batch, skipped = [], 0
        if batch or skipped:
            yield self._collate(batch, skipped)

    def _collate(self, batch: list[tuple], skipped: int) -> dict:
        return {"image": stack_images([image for image, _, _ in batch], self.img_size),
                "label": torch.tensor([label for _, label, _ in batch], dtype=torch.long),
                "key": [key for _, _, key in batch], "skipped": skipped}


class EvalLoader:
    """The validation samples (EvalSamples), read afresh each time it is iterated. Its workers are
    watched as the training loader's are (vitdist.workers): one that dies stops the evaluation within
    seconds, and one that delivers nothing for `timeout_s` (a stalled `pipe:` read) stops it then."""

    def __init__(self, cfg: DataConfig, img_size: int, num_classes: int, rank: int, world_size: int,
                 pin_memory: bool = False, timeout_s: float = 600):
        dataset = EvalSamples(expand_urls(cfg.val_shards), cfg, img_size, num_classes, rank, world_size,
                              cfg.micro_batch_size)
        self.timeout_s = timeout_s
        self.loader = data_loader(dataset, cfg.num_workers, timeout_s, pin_memory=pin_memory)

    def __iter__(self) -> Iterator[dict]:
        return watched(self.loader, self.timeout_s, "validation")


class Normalize:
    """uint8 NCHW on the device -> normalised float32. The constants go to the device once: a
    tensor copied from the host's memory makes the host wait until the device has finished all it
    was given (cudaStreamSynchronize), so a copy per step would leave the GPU idle at the start of
    every step, until the host has queued the next kernels."""

    def __init__(self, cfg: DataConfig, device: torch.device):
        self.mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std
