"""NetworkWrapper: adapts a conditioning dict to the DiT's keyword arguments (SAT's OpenAIWrapper)."""

from __future__ import annotations

import torch
import torch.nn as nn


class NetworkWrapper(nn.Module):
    """`forward(x_t, timesteps, cond, **kwargs)` with `cond` from the conditioner.

    `cond["concat"]` (low-resolution latents for super-resolution, image latents for I2V) is
    concatenated to `x_t` on the channel axis of `B T C H W`; `crossattn` becomes the DiT's
    `context` and `vector` its `y`. Other keyword arguments (`step_idx`, `control`) pass through.
    """

    def __init__(self, diffusion_model: nn.Module, compile_model: bool = False):
        super().__init__()
        self.diffusion_model = diffusion_model
        self._forward = torch.compile(diffusion_model) if compile_model else diffusion_model

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict, **kwargs) -> torch.Tensor:
        if "concat" in cond:
            x_t = torch.cat([x_t, cond["concat"].to(x_t.dtype)], dim=2)
        if "crossattn" not in cond:
            raise ValueError(f"conditioning has no 'crossattn' entry (has {sorted(cond)}); the DiT needs text context")
        return self._forward(x_t, timesteps, context=cond["crossattn"].to(x_t.dtype), y=cond.get("vector"), **kwargs)
