"""Learning-rate schedule: linear warm-up, then cosine, linear or constant decay to min_lr_ratio (restarting
every `total_steps` steps when `restart`: one schedule per progressive-distillation round)."""

from __future__ import annotations

import math

import torch

from vdm.errors import BadInput

DECAYS = ("cosine", "linear", "constant")


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, decay: str = "cosine",
                  min_lr_ratio: float = 0.1) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def make_scheduler(optimizer, warmup_steps: int, total_steps: int, decay: str = "cosine",
                   min_lr_ratio: float = 0.1, restart: bool = False) -> torch.optim.lr_scheduler.LambdaLR:
    if decay not in DECAYS:
        raise BadInput(f"scheduler.decay={decay!r}; valid: {', '.join(DECAYS)}")
    if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise BadInput(f"scheduler.warmup_steps={warmup_steps} must be >= 0 and scheduler.min_lr_ratio="
                       f"{min_lr_ratio} in [0, 1]")
    period = total_steps if restart else None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step % period if period else step, warmup_steps, total_steps, decay,
                                              min_lr_ratio))
