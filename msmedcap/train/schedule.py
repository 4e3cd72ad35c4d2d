"""The reference recipe's learning rate: linear warmup from ``warmup_lr`` to ``lr``, then cosine
down to ``min_lr`` at the stage's last step (LAVIS' LinearWarmupCosineLRScheduler, per step).

Handed to ``deepspeed.initialize`` as a LambdaLR factory, so DeepSpeed steps it once per optimizer
step (not on overflow-skipped steps) and saves it in checkpoints. A DeepSpeed JSON with its own
``scheduler`` section takes precedence (its "auto" values are filled by ds_config.py).
"""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from msmedcap.config import StageConfig


def lr_at(step: int, st: StageConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    if step < st.warmup_steps:
        return st.warmup_lr + (st.lr - st.warmup_lr) * step / st.warmup_steps
    progress = min(1.0, (step - st.warmup_steps) / max(1, st.steps - st.warmup_steps))
    return st.min_lr + (st.lr - st.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(st: StageConfig):
    """``optimizer -> LambdaLR``; the optimizer's lr (the JSON's, filled with ``st.lr``) is the peak."""
    def make(optimizer):
        peak = optimizer.param_groups[0]["lr"]
        return LambdaLR(optimizer, lambda step: lr_at(step, st) / peak)

    return make
