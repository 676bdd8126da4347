"""Learning-rate schedule: a pure function of the optimizer step, so resume needs only the step."""

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`.

    Step 0 already gets lr / warmup_steps (a zero-lr first step would be wasted); from
    `total_steps` on the rate stays at `min_lr`.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
