"""NetworkWrapper: adapts a conditioning dict to the DiT's keyword arguments (SAT's OpenAIWrapper)."""

from __future__ import annotations

import torch
import torch.nn as nn

from vdm.errors import BadInput


class NetworkWrapper(nn.Module):
    """`forward(x_t, timesteps, cond, **kwargs)` with `cond` from the conditioner.

    `cond["concat"]` (low-resolution latents for super-resolution, image latents for I2V) is
    concatenated to `x_t` on the channel axis of `B T C H W`; `crossattn` becomes the DiT's
    `context` and `vector` its `y`. Other keyword arguments (`step_idx`, `ctx`) pass through.

    Inputs are cast to the network's parameter dtype and the output back to `x_t`'s, so a bf16/fp16
    network can serve a float32 denoiser and sampler, whose arithmetic then stays float32.
    """

    def __init__(self, diffusion_model: nn.Module, compile_model: bool = False):
        super().__init__()
        self.diffusion_model = diffusion_model
        if compile_model:
            # In place (`nn.Module.compile`), so the compiled callable is no submodule and every parameter
            # keeps one name. A deepcopy or pickle of the network drops it and runs eagerly.
            diffusion_model.compile()

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict, **kwargs) -> torch.Tensor:
        if "crossattn" not in cond:
            raise BadInput(f"conditioning has no 'crossattn' entry (has {sorted(cond)}); the DiT needs text context")
        out_dtype = x_t.dtype
        # a network without parameters runs in the input's dtype; `.to` of an equal dtype is no copy
        dtype = next(self.diffusion_model.parameters(), x_t).dtype
        x_t = x_t.to(dtype)
        if "concat" in cond:
            x_t = torch.cat([x_t, cond["concat"].to(dtype)], dim=2)
        y = cond.get("vector")
        out = self.diffusion_model(x_t, timesteps, context=cond["crossattn"].to(dtype),
                                   y=None if y is None else y.to(dtype), **kwargs)
        return out.to(out_dtype)
