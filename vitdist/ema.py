"""An exponential moving average of the weights, as timm's ModelEmaV3 keeps it and DeiT trains with:
updated after every optimizer step, validated beside the weights, kept in checkpoints (so a resume
carries it on exactly), exported on request (`vitdist export --ema`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.fsdp import FSDPModule

from .distributed import local


class WeightAverage:
    """The average of `model`'s trained parameters, one tensor of the parameter's own kind each:
    under FSDP a DTensor shard (each rank averages the part it holds), under DDP a full copy; fp32,
    as the weights are (a bf16 average would round away updates of decay 0.9999). Keyed by the
    model's parameter names, which the checkpoint's model state dict uses too. Frozen parameters (a
    linear probe's backbone) are their own average: not copied (a ViT-g's would take 4 GB)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup
        self.model = model
        self.params = {name: param for name, param in model.named_parameters() if param.requires_grad}
        self.average = {name: param.detach().clone() for name, param in self.params.items()}
        self._lerped: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def decay_at(self, step: int) -> float:
        """For the update after optimizer step `step` (1, 2, ...). With warmup, timm's law: the decay
        grows as 1 - step^(-2/3) (0 at the first step: the average starts from the trained weights,
        not the initial ones, which a short run would otherwise carry to its end)."""
        return min(self.decay, 1 - step ** (-2 / 3)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        if self._lerped is None:
            # Listed once, and of a DTensor its local shard (the same storage): DTensor's dispatch per
            # tensor cost 8-20 ms of host time a step over a ViT-B's 152 tensors, 0.4 ms so. At the first
            # update, after the first forward: until pytorch#163130 (2025), FSDP's lazy init gave the
            # shard of a parameter that the ranks do not divide evenly new storage.
            self._lerped = ([local(t) for t in self.average.values()], [local(p.detach()) for p in self.params.values()])
        torch._foreach_lerp_(*self._lerped, 1 - self.decay_at(step))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model computes with the average inside (which holds the weights meanwhile), with its
        own weights again after."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        """The parameters' values and the average's exchanged, one tensor at a time: no second copy
        of all the weights."""
        # FSDP2 with dist.fsdp_reshard_after_forward=false keeps the parameters gathered for the last
        # forward (no backward frees them under no_grad), and the next forward computes with those,
        # not with what was copied into the shards since: the weights validated as the average, or
        # the average trained on.
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        for name, param in self.params.items():
            kept = param.detach().clone()
            param.copy_(self.average[name])
            self.average[name].copy_(kept)
