"""Process group set-up and the data-parallel wrapper, applied to the model from outside."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .config import DistConfig


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(cfg: DistConfig) -> DistContext:
    """Join torchrun's process group; without torchrun, a one-process group, so every code path
    (collectives, distributed checkpoints) is the same with 1 process as with 1,000."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s),
                            device_id=device if backend == "nccl" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: torch.nn.Module, cfg: DistConfig, ctx: DistContext) -> torch.nn.Module:
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def grad_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """On accumulation micro-steps gradients stay local: one all-reduce per optimizer step."""
    if not enabled and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def merge_across_ranks(local: dict) -> dict:
    """The union of every rank's small dict (e.g. the positions of the data streams each rank owns)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}
