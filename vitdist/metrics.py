"""Scalars to TensorBoard and the console, from rank 0 only."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_CONSOLE = {  # tag -> (short name, format)
    "train/loss": ("loss", "{:.4f}"), "train/lr": ("lr", "{:.2e}"), "train/grad_norm": ("grad_norm", "{:.3f}"),
    "perf/images_per_sec": ("img/s", "{:.1f}"), "perf/data_wait_frac": ("data_wait", "{:.1%}"),
    "perf/mfu": ("mfu", "{:.1%}"), "perf/mem_peak_gib": ("mem_gib", "{:.1f}"), "train/skipped_steps": ("skipped_steps", "{:.0f}"),
    "data/skipped": ("skipped", "{:.0f}"), "val/loss": ("val_loss", "{:.4f}"), "val/top1": ("val_top1", "{:.2%}"),
    "val/top5": ("val_top5", "{:.2%}"), "val/skipped": ("val_skipped", "{:.0f}"),
    "val_ema/loss": ("val_ema_loss", "{:.4f}"), "val_ema/top1": ("val_ema_top1", "{:.2%}"),
    "val_ema/top5": ("val_ema_top5", "{:.2%}"),
}


class MetricLogger:
    def __init__(self, tb_dir: str | Path, total_steps: int, enabled: bool, purge_step: int | None = None):
        """`purge_step`: on resume, hide whatever an earlier, killed run logged from this step on."""
        self.tb_dir, self.total_steps, self.enabled, self.writer = tb_dir, total_steps, enabled, None
        self.first: tuple[float, int] | None = None  # (time, step) of the first line, which the ETA counts from
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(tb_dir), purge_step=purge_step)
            if not isinstance(threading.excepthook, _QuietTensorBoardThreads):
                threading.excepthook = _QuietTensorBoardThreads(threading.excepthook)

    def text(self, step: int, tag: str, markdown: str) -> None:
        """Text in TensorBoard's text tab (written with the next scalars, whose write reports a failure)."""
        if self.writer is not None:
            self.writer.add_text(tag, markdown, step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            try:
                for tag, value in scalars.items():
                    self.writer.add_scalar(tag, value, step)
                self.writer.flush()
            except OSError as error:
                self._stop_writing(step, error)
        fields = [f"{_CONSOLE[t][0]} {_CONSOLE[t][1].format(v)}" for t, v in scalars.items() if t in _CONSOLE]
        # From the first line of training figures on, not the start: start-up (compilation, the
        # loader's first batches) would inflate it, and a resume's owed validation is logged before
        # it. Validation and checkpoints are in it, as they will be in the time left.
        now = time.monotonic()
        if "train/loss" in scalars:
            start_time, start_step = self.first = self.first or (now, step)
            if start_step < step < self.total_steps:
                fields.append(f"eta {_duration((now - start_time) / (step - start_step) * (self.total_steps - step))}")
        print(f"step {step}/{self.total_steps} | " + " | ".join(fields), file=sys.stdout, flush=True)

    def _stop_writing(self, step: int, error: OSError) -> None:
        """A full disk or a lost file system under tb/ costs the run its TensorBoard lines, not the
        run itself: a checkpoint save, which needs the space more, fails then in its own words
        (ckpt.on_error), and the console keeps the scalars."""
        log.warning("step %d: TensorBoard logging stops, its event file in %s could not be written (%s); training goes "
                    "on, its lines on the console only (a resume writes to TensorBoard again)", step, self.tb_dir, error)
        with contextlib.suppress(OSError):  # the writer's thread may fail the close again
            self.writer.close()
        self.writer = None

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as error:  # at the run's end or its preemption: nothing goes on
                log.warning("TensorBoard's event file in %s could not be completed (%s): its last lines may be missing",
                            self.tb_dir, error)


class _QuietTensorBoardThreads:
    """The report of an exception that ends a thread (`previous`), but for TensorBoard's writer
    thread: a write that fails there is raised again by the next write in the training thread, and
    reported there once (MetricLogger._stop_writing), not as the thread's traceback too."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, args: threading.ExceptHookArgs) -> None:
        if not type(args.thread).__module__.startswith("tensorboard."):
            self.previous(args)


def _duration(seconds: float) -> str:
    """3h07m, 12m05s, 41s."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """FLOP/s of a square matrix product on this device, the ceiling MFU is measured against: the
    fastest of the products run in `seconds`, each timed on its own. The product is a linear
    layer's, as the model computes most of its FLOPs: on a CPU without bf16 instructions, a bf16
    `a @ b` runs 5x slower than the oneDNN kernel a bf16 linear layer takes, and perf/mfu read
    170-260% against it. On a CPU, one core's speed
    times the threads this process computes on: each product runs on one thread and is timed by
    that thread's CPU time, which other processes on the cores (other jobs on a shared machine)
    do not stretch as they stretch the clock. Timed by the clock, a core of the 2-core test
    machine loaded by other processes measured at half its speed, and perf/mfu read above 100%."""
    if device.type == "cuda":
        return _fastest_product_flops(8192, device, dtype, seconds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return threads * _fastest_product_flops(512, device, dtype, seconds)
    finally:
        torch.set_num_threads(threads)


def _fastest_product_flops(n: int, device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def product_s() -> float:
        """One product's seconds: on a CPU its thread's CPU time; on a GPU between its stream's
        events, as the anchors time theirs: host time would add the launch and the wait for the
        GPU, and the peak would read low."""
        if device.type != "cuda":
            start = time.thread_time()
            F.linear(a, b)
            return time.thread_time() - start
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        F.linear(a, b)
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    product_s()  # warm-up: library load, kernel choice
    fastest, start = math.inf, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fastest = min(fastest, product_s())
    return 2 * n**3 / fastest
