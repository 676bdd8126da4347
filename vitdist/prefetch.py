"""The training device's side of the input pipeline: loader batches moved (and, for data.decode:
gpu, decoded) onto the device ahead of the step that needs them."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Generator

import torch

from .commands import end_all
from .gpu_decode import to_device
from .samples import Skips

# Seconds a stopping loader thread may take to finish the batch it is preparing, before its reads
# are taken for stalled (see DeviceBatches.__exit__): a batch decoded in the training process
# itself (data.num_workers=0) takes a few.
STOP_GRACE_S = 10


class DeviceBatches:
    """Loader batches with their images and labels on the device, prepared by a background thread
    `ahead` batches before the step asks, on a CUDA stream of its own: the host work of decoding
    (launches, decoding, resizing) and its kernels overlap the training step instead of
    adding to it. On a CPU device the thread still overlaps it with the step's Python. JPEGs found
    corrupt only here are added to their batch's "skipped", as the workers' bad samples are. The
    batches end where `batches` ends; an error it raises is raised by the call that would have
    had the next batch, and by every call after."""

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
        """Stop the thread, then close the loader's generator, which shuts its workers down now
        rather than whenever the last reference to it goes (after an error, at interpreter exit).
        A thread still reading after STOP_GRACE_S is in a stalled read, which a `pipe:` command no
        longer leaves at a preemption's SIGTERM (vitdist.tars): the reads of this process
        (data.num_workers=0) are ended, and a thread still waiting on a worker's is left behind (the
        workers end with this process), so that the run exits rather than wait for data it no
        longer needs until the loader's timeout."""
        self.stopped.set()
        if not self._joined(STOP_GRACE_S):
            end_all()
            if not self._joined(STOP_GRACE_S):
                return
        self.batches.close()

    def _joined(self, seconds: float) -> bool:
        """Whether the thread ended within `seconds`."""
        deadline = time.monotonic() + seconds
        while self.thread.is_alive():
            if time.monotonic() > deadline:
                return False
            with contextlib.suppress(queue.Empty):  # unblock a waiting put, the end's too; the thread then sees `stopped`
                self.ready.get_nowait()
            self.thread.join(timeout=0.1)
        return True

    def _fill(self, batches: Generator[dict]) -> None:
        skips = Skips()  # one for the thread: its warnings are capped as a worker's are
        try:
            on_stream = torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext()
            with on_stream:
                for batch in batches:
                    if self.stopped.is_set():
                        return
                    counted = skips.counts.copy()
                    batch["image"] = to_device(batch, self.device, skips)
                    batch["skipped"] += skips.counts - counted
                    batch["label"] = batch["label"].to(self.device, non_blocking=True)
                    done = self.stream.record_event() if self.stream else None
                    self.ready.put((batch, done))
            end = StopIteration()
        except BaseException as error:  # the step re-raises it: a loader failure must stop training
            end = error
        self.ready.put((end, None))

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> dict:
        batch, done = self.ready.get()
        if isinstance(batch, BaseException):
            self.ready.put((batch, done))  # the source has ended: every later call ends alike
            raise batch
        if done is not None:
            step_stream = torch.cuda.current_stream(self.device)
            step_stream.wait_event(done)
            for name in ("image", "label"):  # made on the side stream, freed after the step's use
                batch[name].record_stream(step_stream)
        return batch
