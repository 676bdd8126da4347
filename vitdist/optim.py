"""AdamW over timm's parameter groups: no weight decay on norms, biases, pos_embed and cls_token."""

import torch
from timm.optim import param_groups_weight_decay

from .config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=model.no_weight_decay())
    on_cuda = next(model.parameters()).is_cuda
    # lr is set from the schedule before every step; fused AdamW is one kernel on CUDA.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=on_cuda or None)
