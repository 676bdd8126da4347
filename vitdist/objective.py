"""Objectives: batch in, loss out. The training step calls `objective(dp_model, images, labels)`
and nothing else; it must call the wrapped model itself, whose forward is where DDP's gradient
hooks run. What a masked-image objective for unlabeled shards needs beyond that (its decoder among
the weights that are wrapped, optimised and checkpointed, shards read without labels, its own
validation score, a FLOP count, export leaving the decoder out) is the loop's to give it; none is
there yet."""

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
