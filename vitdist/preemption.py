"""Preemption: SLURM sends SIGTERM or SIGUSR1 before a time limit or a preemption. The loop
finishes its step and the next (a validation, its batch in progress), every rank together, saves
a checkpoint and exits with PREEMPTED_EXIT_CODE, which tells a batch script to requeue rather
than give up."""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

from . import distributed

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

log = logging.getLogger(__name__)


class Preemption:
    def __init__(self):
        self.received: int | None = None
        self._agreeing: tuple[dist.Work, torch.Tensor] | None = None  # started at the step before
        for signum in SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: checkpointing after the next step (the ranks agree on it a step later; a validation "
                        "stops at its next batch), then exiting with %d",
                        signal.Signals(signum).name, PREEMPTED_EXIT_CODE)
        self.received = signum

    def signalled(self) -> bool:
        """Whether this rank has had a signal (the ranks agree on it at their next collective)."""
        return self.received is not None

    def requested(self, ctx: distributed.DistContext) -> bool:
        """True on every rank, at the same step, once any rank has a signal. Each step starts the
        ranks' agreement and reads the one the step before started, which has had a step to
        finish: no rank waits a round trip over the network for the others at every step."""
        flag = torch.tensor([int(self.signalled())])
        started = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.control, async_op=True)
        agreeing, self._agreeing = self._agreeing, (started, flag)
        if agreeing is None:
            return False
        agreeing[0].wait()
        return bool(agreeing[1].item())

    def settle(self) -> None:
        """Wait for the agreement in flight; the next step reads it without waiting. A collective
        started under torch.profiler ends its record in gloo's thread when it completes: ending
        there after the profiler has stopped writes into freed memory (the process aborts later)."""
        if self._agreeing is not None:
            self._agreeing[0].wait()
