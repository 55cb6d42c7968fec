"""Exponential moving average of the trainable weights, in float32 on the weights' device. Under FSDP
each average is a DTensor sharded like its parameter: every process averages its own shard."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from vdm.errors import BadInput
from vdm.training.parallel import shard_like


class EMA:
    """`shadow = decay * shadow + (1 - decay) * weight` after every optimizer step.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated
    by the random initialisation. `state_dict()` holds the (possibly sharded) averages and
    `__num_updates__`; `load_state_dict` takes whole tensors, as a checkpoint file holds them.
    """

    def __init__(self, named_params: dict[str, nn.Parameter], decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise BadInput(f"ema.decay={decay} must be in (0, 1)")
        self.decay = decay
        self.params = named_params
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}
        self.num_updates = 0

    @torch.no_grad()
    def reset(self) -> None:
        """Start over from the current weights (a new distillation round)."""
        for k, p in self.params.items():
            self.shadow[k].copy_(p.detach())
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
            raise BadInput(f"EMA state lacks {sorted(missing)[0]!r} ({len(missing)} missing)")
        with torch.no_grad():
            for k, shadow in self.shadow.items():
                shadow.copy_(shard_like(state[k], shadow))
        self.num_updates = int(state["__num_updates__"])

    @contextlib.contextmanager
    def applied(self):
        """Temporarily load the averages into the parameters (for logging samples)."""
        backup = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(backup[k])
