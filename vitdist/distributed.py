"""Process groups, and the model made ready for them from outside: moved, DDP or FSDP2, compiled."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch._functorch.config
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.rendezvous import rendezvous
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .config import Config, DistConfig

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    control: dist.ProcessGroup | None = None  # gloo, for small host-side agreements off the training stream
    store: dist.Store | None = None  # the group's key-value store (torchrun's), reachable when a peer is not

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signal_at_parent_death(signum: int) -> bool:
    """Ask Linux to send this process `signum` when the thread that started it ends (its process's
    death included); False elsewhere, where nothing is sent."""
    if not sys.platform.startswith("linux"):
        return False
    ctypes.CDLL(None, use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG
    return True


def die_with_launcher() -> None:
    """torchrun starts workers in sessions of their own: if torchrun is SIGKILLed, they would go on
    training, unseen, beside the next run, or wait for its store (300 s, then torch's retries: 10
    minutes and more) in the checks before the process group, 0.7 GB each. Under torchrun, ask Linux
    to kill this worker when its parent dies; the first thing a worker does."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    if signal_at_parent_death(signal.SIGKILL) and os.getppid() == 1:  # died before the request was in place
        os._exit(1)


_round_store: dist.Store | None = None  # this process's, once made (rank 0 may host it: made once)


def _attempt_store(timeout: timedelta) -> dist.Store:
    """The launcher's key-value store (torchrun's; without torchrun, one rank 0 hosts), in a key
    space of this round of workers: torchrun restarts the ranks (--max-restarts, or a node joining)
    with the same store, which still holds the last round's keys, and gloo would connect to dead
    ranks' ports, refuse_together read dead ranks' verdicts."""
    global _round_store
    if _round_store is None:
        store, rank, world_size = next(rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
        _round_store = dist.PrefixStore(f"vitdist/round_{_agree_round(store, rank, world_size, timeout)}", store)
    _round_store.set_timeout(timeout)
    return _round_store


def _agree_round(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> int:
    """A number the ranks of this round share and no earlier round in `store` had. Not torchrun's
    restart count: under c10d rendezvous a node restarted for another node's failure keeps its own,
    and the two nodes' ranks met in different key spaces (a hang, or a restart lost to gloo).
    Rank 0 draws the number; every other rank draws one of its own, which only this round's rank 0
    can have seen (an earlier round's is dead by now), and waits for rank 0's answer under it. The
    ranks' requests are appended to one key, so that rank 0 reads them all in one request."""
    if rank != 0:
        mine = store.add(f"vitdist/rank_{rank}/starts", 1)
        store.append("vitdist/requests", f"{rank}:{mine} ")
        answer = f"vitdist/rank_{rank}/round_for_{mine}"
        store.wait([answer])
        drawn = int(store.get(answer))
        store.add(f"vitdist/round_{drawn}/joined", 1)
        return drawn
    drawn = store.add("vitdist/rounds", 1)
    answered, deadline = 0, time.monotonic() + timeout.total_seconds()
    while (joined := store.add(f"vitdist/round_{drawn}/joined", 0)) < world_size - 1:
        # Earlier rounds' requests are answered too, unheard: their ranks are gone.
        requests = store.get("vitdist/requests") if store.check(["vitdist/requests"]) else b""
        for request in requests[answered:].split():
            other, theirs = request.decode().split(":")
            store.set(f"vitdist/rank_{other}/round_for_{theirs}", str(drawn))
        answered = len(requests)
        if time.monotonic() > deadline:
            raise dist.DistStoreError(f"{world_size - 1 - joined} of {world_size - 1} rank(s) did not join the process "
                                      f"group's store within {timeout.total_seconds():.0f} s")
        time.sleep(0.05)
    return drawn


def refuse_together(error: str | None, report: Callable[[str], None], timeout_s: float = 300.0) -> bool:
    """Whether any rank refuses to start; if so every rank reports the same refusal (its own, or
    the first refusing rank's) before any of them exits. Under torchrun the ranks post their
    verdicts to the launcher's key-value store (no process group exists yet) and wait for all:
    a rank that refused alone would leave its peers waiting on it in training, and torchrun stops
    every rank as soon as the first exits, before slower ones have said why."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        if error is not None:
            report(error)
        return error is not None
    store = dist.PrefixStore("preflight/", _attempt_store(timedelta(seconds=timeout_s)))
    ranks = [str(rank) for rank in range(world_size)]
    store.set(os.environ["RANK"], error or "")
    store.wait(ranks)
    refusals = [(rank, message) for rank in ranks if (message := store.get(rank).decode())]
    if not refusals:
        return False
    rank, first = refusals[0]
    report(first if len(refusals) == world_size else f"{first} (on rank {rank})")
    store.set(f"reported/{os.environ['RANK']}", "")
    store.wait([f"reported/{rank}" for rank in ranks])
    return True


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
    timeout = timedelta(seconds=cfg.timeout_s)
    store = _attempt_store(timeout)
    dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout,
                            device_id=device if backend == "nccl" else None)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    control = dist.new_group(backend="gloo", timeout=timeout)
    log.info("rank %d of %d (local rank %d) on %s%s", dist.get_rank(), dist.get_world_size(), local_rank,
             os.environ.get("SLURMD_NODENAME", socket.gethostname()), f", torchrun restart {restarts}" if restarts else "")
    return DistContext(dist.get_rank(), dist.get_world_size(), device, control, store)


def is_collective_failure(error: BaseException) -> bool:
    """A collective that failed because a peer is gone or silent (gloo names only an address)."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "/gloo/" in str(error))


def lost_contact(ctx: DistContext, error: BaseException, wait_s: float = 5.0) -> str:
    """What a rank whose collective failed can say of its peers: every rank that meets the failure
    reports it in the store, and those that have not within `wait_s` are the ones dead or hung."""
    where = f"rank {ctx.rank} lost contact with the process group"
    cause = str(error).splitlines()[0][:300]
    try:
        ctx.store.set_timeout(timedelta(seconds=wait_s))
        ctx.store.set(f"vitdist/lost_contact/{ctx.rank}", "")
        deadline = time.monotonic() + wait_s
        while True:
            silent = [r for r in range(ctx.world_size) if not ctx.store.check([f"vitdist/lost_contact/{r}"])]
            if not silent or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except Exception as store_error:  # the store's host (the first node's torchrun) is gone too
        return f"{where}; its store is unreachable too ({str(store_error).splitlines()[0][:200]}): {cause}"
    if not silent:
        return f"{where}; every rank met the failure, none is silent: {cause}"
    return (f"{where}: rank(s) {', '.join(map(str, silent))} did not report within {wait_s:.0f} s, dead or hung "
            f"(see their logs): {cause}")


def close() -> None:
    global _round_store
    if dist.is_initialized():
        dist.destroy_process_group()
    _round_store = None  # a process group made after this one meets in a key space of its own


def parallelize(model: torch.nn.Module, cfg: DistConfig, precision: str, ctx: DistContext) -> torch.nn.Module:
    """DDP: a wrapper around the model, but for one process, which has nothing to synchronise.
    FSDP2: each block, then the root, sharded in place, with parameters gathered in the compute
    dtype and gradients reduced in `dist.fsdp_reduce_dtype`."""
    if cfg.strategy == "ddp" and ctx.world_size == 1:
        # DDP on one rank would still copy every gradient into its buckets and all-reduce them,
        # and under compile split the graph at each bucket, which stops fusion across the splits.
        return model
    if cfg.strategy == "ddp":
        # Gradients as views into DDP's communication buckets: no copy back out of them after
        # each all-reduce (the step's fresh gradients still go in: zero_grad sets them to None).
        return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=DTYPES[cfg.fsdp_reduce_dtype])
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    return model


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def grad_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """On accumulation micro-steps gradients stay local: one reduction per optimizer step."""
    if enabled:
        return contextlib.nullcontext()
    # torch.compile's wrapper is no DDP module, yet DDP's forward, which reads no_sync's flag,
    # still runs eagerly inside it: without unwrapping, every micro-step would all-reduce.
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if isinstance(model, FSDPModule):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm (over all shards under FSDP) before clipping, which the NaN/Inf
    guard and the logs read; the gradients are clipped to `max_norm`, unless it is 0: clipping is
    off, and no pass over them scales them by 1."""
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def local_numel(model: torch.nn.Module) -> int:
    """Parameter elements held by this rank (a shard of each under FSDP)."""
    return sum(local(p).numel() for p in model.parameters())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard (the same storage), any other whole."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def from_rank_zero(compute: Callable[[], T], group: dist.ProcessGroup, expected: tuple[type[Exception], ...]) -> T:
    """`compute()` on rank 0 alone, its value on every rank; or the exception of the `expected`
    kinds (which must pickle, as OSError and ValueError do) it raised, raised on every rank. Any
    other one is raised on rank 0 as it is, on the others as a RuntimeError that names it: a failure
    on rank 0 alone would leave the others waiting in their next collective until dist.timeout_s."""
    result, unexpected = [None, None], None
    if dist.get_rank() == 0:
        try:
            result = [compute(), None]
        except expected as e:
            result = [None, e]
        except Exception as e:  # sent as text: it may not pickle
            result, unexpected = [None, RuntimeError(f"rank 0 failed: {e!r}")], e
    dist.broadcast_object_list(result, src=0, group=group)
    if unexpected is not None:
        raise unexpected
    if result[1] is not None:
        raise result[1]
    return result[0]


def on_rank_zero(write: Callable[[], None], group: dist.ProcessGroup,
                 expected: tuple[type[Exception], ...]) -> Exception | None:
    """`write()` on rank 0 alone (from_rank_zero); every rank gets the exception of the `expected`
    kinds it raised, None if it succeeded."""
    try:
        from_rank_zero(write, group, expected)
    except expected as e:
        return e
    return None


def any_rank(flags: list[bool], ctx: DistContext) -> list[bool]:
    """Each flag true on every rank if it is true on any (over the gloo control group: no device sync)."""
    values = torch.tensor([int(flag) for flag in flags])
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=ctx.control)
    return [bool(value) for value in values.tolist()]


def any_rank_on_device(flag: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor as 0./1., 1. on every rank if it is true on any; stays on the device."""
    value = flag.float()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def peak_memory_gib(ctx: DistContext) -> float:
    """The most GPU memory that tensors held on any rank since the last call, in GiB: what an OOM
    is near (read on the host, compared over the gloo control group: no device sync)."""
    peak = torch.tensor([torch.cuda.max_memory_allocated(ctx.device) / 2**30])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=ctx.control)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    return peak.item()


def merge_across_ranks(local: dict, ctx: DistContext) -> dict:
    """The union of every rank's small dict (e.g. the positions of the data streams each rank owns)."""
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, local, group=ctx.control)
    return {k: v for part in parts for k, v in part.items()}


def prepare_model(model: torch.nn.Module, cfg: Config, ctx: DistContext) -> torch.nn.Module:
    """Move, distribute and compile the model; returns what the training step calls (`model`
    itself keeps its parameter names for checkpoints). DDP: the wrapped model compiled whole,
    so that fusion crosses block boundaries and dynamo splits the graph at DDP's gradient buckets
    (measured on an H100: 9% faster than per-block compile for checkpointed ViT-B/16, 1% for
    ViT-L/16; bench/RESULTS.md). FSDP2: each block compiled on its own, in place, between the
    hooks that gather and free its parameters. compile reads the activation memory budget when the
    model first runs, from a process-wide setting: it is set here for every run, the default too."""
    model = model.to(ctx.device)
    torch._functorch.config.activation_memory_budget = cfg.train.activation_memory_budget
    if cfg.train.compile and cfg.dist.strategy == "fsdp":
        for block in model.blocks:
            block.compile()
    dp_model = parallelize(model, cfg.dist, cfg.train.precision, ctx)
    return torch.compile(dp_model) if cfg.train.compile and cfg.dist.strategy == "ddp" else dp_model


def compute_precision(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """The context forward passes run in. bf16 under DDP: autocast over the fp32 weights. Under
    FSDP the parameters are gathered in bf16 already, so the whole forward, residual stream
    included, runs in bf16 without a cast per op; the fp32 shards stay the optimizer's."""
    bf16 = cfg.train.precision == "bf16" and cfg.dist.strategy == "ddp"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
