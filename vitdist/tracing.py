"""A profile of some training steps in the run itself (`log.profile_steps`): torch.profiler's
trace of the host and the GPU, the data loader's waits included, one file per rank that
Perfetto (ui.perfetto.dev) or chrome://tracing opens."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .files import written_whole

log = logging.getLogger(__name__)


class StepProfiler:
    """Profiles steps `first` to `last` (1-based, inclusive) of `steps` = [first, last] ([]: none);
    a run resumed inside them profiles the rest, and one that ends inside them (train.steps, a
    preemption) writes the trace of those it ran. A context manager: the run's end stops it."""

    def __init__(self, steps: list[int], out_dir: Path, rank: int, settle: Callable[[], None]):
        """`settle`: waits for the collectives still running that started during the steps."""
        self.steps, self.out_dir, self.rank, self.settle = steps, out_dir, rank, settle
        self.profiler: profile | None = None
        self.first = self.last = 0  # the first and the latest step profiled
        self.step_range: record_function | None = None

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """A profiler still running at the process's exit crashes it (SIGSEGV: a preempted run
        exited -11, not 75; a failed one, not 2). After an error the other ranks may never complete
        the agreement `settle` waits for: stopped without waiting, which only risks that crash
        (gloo's thread would end the agreement's record after the stop), where running on makes it certain."""
        if self.profiler is not None:
            self._stop(settle=kind in (None, SystemExit))

    def step_starts(self, step: int) -> None:
        if not self.steps or not self.steps[0] <= step <= self.steps[1]:
            return
        if self.profiler is None:
            self.first = step
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
        self.last = step
        self.step_range = record_function(f"step {step}")  # the steps told apart in the trace
        self.step_range.__enter__()

    def step_ends(self, step: int) -> None:
        if self.step_range is None:
            return
        self._end_range()
        if step == self.steps[1]:
            self._stop()

    def _end_range(self) -> None:
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None

    def _stop(self, settle: bool = True) -> None:
        self._end_range()  # a preemption or an error exits within its step
        if settle:
            self.settle()
        self.profiler.__exit__(None, None, None)  # waits for the GPU's events
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank{self.rank}-steps{self.first}-{self.last}.json"
        # Whole or not at all: at a preemption torchrun may SIGTERM this rank mid-write, once another exits 75
        with written_whole(trace) as partial:
            self.profiler.export_chrome_trace(str(partial))
        self.profiler = None
        log.info("steps %d-%d profiled: %s (open it in ui.perfetto.dev)", self.first, self.last, trace)
