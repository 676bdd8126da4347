"""AdamW over timm's parameter groups: no weight decay on norms, biases, pos_embed and cls_token;
with layer-wise lr decay for fine-tuning, each group carries an `lr_scale` the loop applies."""

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

from .config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, layer_decay: float = 1.0) -> torch.optim.AdamW:
    """Only parameters that require gradients (a frozen backbone's do not) are optimised."""
    skip = model.no_weight_decay()
    if layer_decay < 1.0:
        groups = param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    # lr is set from the schedule before every step. Fused: one kernel on CUDA, and the only AdamW
    # that can skip a step on the device (step_unless_bad).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def step_unless_bad(optimizer: torch.optim.AdamW, bad: torch.Tensor) -> None:
    """optimizer.step(), skipped where the 0-d float flag `bad` is 1: parameters, moments and step
    counts stay as they were. Decided on the device, since reading the flag on the host every step
    would stall it; the fused kernel takes the flag as an optimizer attribute, the way
    torch.amp.GradScaler hands it over."""
    optimizer.found_inf = bad
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class NonFiniteTraining(RuntimeError):
    """Too many steps in a row with a NaN/Inf loss or gradient norm: the run stops."""


class BadSteps:
    """The current run of steps skipped for a NaN/Inf loss or gradient norm, and the longest run
    since the last check, kept on the device: they are read only at log and checkpoint steps,
    which wait for the device anyway."""

    def __init__(self, device: torch.device):
        self.in_a_row = torch.zeros((), device=device)
        self.longest = torch.zeros((), device=device)

    def record(self, bad: torch.Tensor) -> None:
        self.in_a_row = (self.in_a_row + bad) * bad
        self.longest = torch.maximum(self.longest, self.in_a_row)

    def ongoing(self) -> int:
        """How many of the latest steps in a row were skipped."""
        return int(self.in_a_row.item())

    def check(self, limit: int, step: int) -> None:
        longest, self.longest = int(self.longest.item()), self.in_a_row.clone()
        if limit and longest >= limit:
            raise NonFiniteTraining(
                f"{longest} steps in a row up to step {step} had a NaN/Inf loss or gradient norm "
                f"(train.max_bad_steps={limit}); they were skipped and none was checkpointed, so the newest "
                f"complete checkpoint is from before them. Lower optim.lr, lengthen optim.warmup_steps or look "
                f"at the data this run met, then resume")
