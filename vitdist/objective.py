"""Objectives: batch in, loss out. The loop calls `objective(model, images, labels)` and nothing
else, so a masked-image objective for unlabeled shards plugs in beside this one."""

import torch
import torch.nn.functional as F
from timm.data import Mixup

from .config import TrainConfig


class Classification:
    """Cross-entropy on the class labels, with label smoothing and timm's mixup/cutmix."""

    def __init__(self, cfg: TrainConfig, num_classes: int):
        self.label_smoothing = cfg.label_smoothing
        self.mixup = None
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                               label_smoothing=cfg.label_smoothing, num_classes=num_classes)

    def __call__(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.mixup is None:
            return F.cross_entropy(model(images).float(), labels, label_smoothing=self.label_smoothing)
        images, soft_targets = self.mixup(images, labels)
        return torch.sum(-soft_targets * F.log_softmax(model(images).float(), dim=-1), dim=-1).mean()
