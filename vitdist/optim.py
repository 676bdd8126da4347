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
    on_cuda = next(model.parameters()).is_cuda
    # lr is set from the schedule before every step; fused AdamW is one kernel on CUDA.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=on_cuda or None)
