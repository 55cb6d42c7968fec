"""Exponential moving average of the trainable weights (kept in float32, on the weights' device)."""

from __future__ import annotations

import torch
import torch.nn as nn


class EMA:
    """`shadow = decay * shadow + (1 - decay) * weight` after every optimizer step.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated
    by the random initialisation.
    """

    def __init__(self, named_params: dict[str, nn.Parameter], decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay={decay} must be in (0, 1)")
        self.decay = decay
        self.params = named_params
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "__num_updates__": torch.tensor(self.num_updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[0]!r} ({len(missing)} missing)")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])
        self.num_updates = int(state["__num_updates__"])
