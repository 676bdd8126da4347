"""Preemption: SLURM sends SIGTERM or SIGUSR1 before a time limit or a preemption. The loop
finishes its step, every rank together, saves a checkpoint and exits with PREEMPTED_EXIT_CODE,
which tells a batch script to requeue rather than give up."""

from __future__ import annotations

import logging
import signal

from . import distributed

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

log = logging.getLogger(__name__)


class Preemption:
    def __init__(self):
        self.received: int | None = None
        for signum in SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: checkpointing after this step, then exiting with %d",
                        signal.Signals(signum).name, PREEMPTED_EXIT_CODE)
        self.received = signum

    def requested(self, ctx: distributed.DistContext) -> bool:
        """True on every rank once any rank has a signal, so they all stop at the same step."""
        return distributed.any_rank(self.received is not None, ctx)
