"""Scalars to TensorBoard and the console, from rank 0 only."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

_CONSOLE = {  # tag -> (short name, format)
    "train/loss": ("loss", "{:.4f}"), "train/lr": ("lr", "{:.2e}"), "train/grad_norm": ("grad_norm", "{:.3f}"),
    "perf/images_per_sec": ("img/s", "{:.1f}"), "perf/data_wait_frac": ("data_wait", "{:.1%}"),
    "perf/mfu": ("mfu", "{:.1%}"), "train/skipped_steps": ("skipped_steps", "{:.0f}"),
    "data/skipped": ("skipped", "{:.0f}"), "val/loss": ("val_loss", "{:.4f}"), "val/top1": ("val_top1", "{:.2%}"),
    "val/top5": ("val_top5", "{:.2%}"), "val/skipped": ("val_skipped", "{:.0f}"),
}


class MetricLogger:
    def __init__(self, tb_dir: str | Path, total_steps: int, enabled: bool, purge_step: int | None = None):
        """`purge_step`: on resume, hide whatever an earlier, killed run logged from this step on."""
        self.total_steps, self.writer = total_steps, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(tb_dir), purge_step=purge_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        fields = [f"{_CONSOLE[t][0]} {_CONSOLE[t][1].format(v)}" for t, v in scalars.items() if t in _CONSOLE]
        print(f"step {step}/{self.total_steps} | " + " | ".join(fields), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product on this device, the ceiling MFU is measured against."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: library load, kernel choice
    repeats = 10 if device.type == "cuda" else 3
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)
