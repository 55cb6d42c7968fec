"""Preconditioning: D(x_t) = c_skip·x_t + c_out·F(c_in·x_t, idx, cond), in the alpha parametrisation.

This is the only place where the network's parametrisation (v, eps, x0) is known; samplers and the loss
see the denoised estimate x0_hat only.
"""

import torch
from torch import nn

from vdm.errors import BadInput

from .discretization import Discretization


class VideoScaling:
    """v-prediction: x0 = a·x_t − sqrt(1−a²)·v.

    sgm's sigma-space ``VScaling`` (c_skip = 1/(σ²+1), c_out = −σ/sqrt(σ²+1), c_in = 1/sqrt(σ²+1)) is the
    same parametrisation written for x_t/a; in alpha space it is exactly this class, hence ``VScaling``.
    """

    def __call__(self, alpha_cumprod_sqrt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = alpha_cumprod_sqrt
        return a, -(1 - a**2).sqrt(), torch.ones_like(a)


VScaling = VideoScaling


class EpsScaling:
    """eps-prediction: x0 = (x_t − sqrt(1−a²)·eps)/a (undefined at zero SNR, a = 0)."""

    def __call__(self, alpha_cumprod_sqrt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = alpha_cumprod_sqrt
        return 1 / a, -(1 - a**2).sqrt() / a, torch.ones_like(a)


class X0Scaling:
    """x0-prediction: the network output is the denoised estimate."""

    def __call__(self, alpha_cumprod_sqrt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = alpha_cumprod_sqrt
        return torch.zeros_like(a), torch.ones_like(a), torch.ones_like(a)


class DiscreteDenoiser(nn.Module):
    """Snaps a to the nearest entry of the T-step table; c_skip and c_out use that table value (SPEC §3).

    The network's timestep (c_noise) is the caller's `timesteps` when given — the sampler's grid
    timestep, as CogVideoX SAT and diffusers pass it, or the training loss's sampled index — and the
    snapped index otherwise. With the SAT "subset" grid the snapped index can be one below the grid
    timestep at a few of 50 steps, which is why samplers pass their timestep explicitly.
    """

    def __init__(self, discretization: Discretization, scaling, num_idx: int = 1000):
        super().__init__()
        if num_idx != discretization.num_timesteps:
            raise BadInput(
                f"num_idx must equal discretization.num_timesteps={discretization.num_timesteps}, got {num_idx}"
            )
        table = discretization.table()
        finite = torch.stack(scaling(table)).isfinite().all(dim=0)  # (T,)
        if not finite.all():  # e.g. EpsScaling at zero terminal SNR: x0 cannot be recovered from eps
            t = int((~finite).nonzero()[0])
            raise BadInput(
                f"scaling {type(scaling).__name__} is not finite at timestep {t} (alpha_cumprod_sqrt="
                f"{table[t].item():.4g}) of {type(discretization).__name__}; use a discretization with a > 0 "
                "everywhere (e.g. LegacyDDPM)"
            )
        self.scaling = scaling
        self.num_idx = num_idx
        # derived from the discretization, so kept out of checkpoints
        self.register_buffer("alpha_cumprod_sqrt", table.float(), persistent=False)

    def idx_from_alpha(self, alpha_cumprod_sqrt: torch.Tensor) -> torch.Tensor:
        a = alpha_cumprod_sqrt.to(self.alpha_cumprod_sqrt)
        return (a[..., None] - self.alpha_cumprod_sqrt).abs().argmin(dim=-1)

    def forward(
        self,
        network,
        x_t: torch.Tensor,
        alpha_cumprod_sqrt: torch.Tensor,
        cond: dict,
        timesteps: torch.Tensor | None = None,
        **model_kwargs,
    ):
        idx = self.idx_from_alpha(alpha_cumprod_sqrt)  # (B,)
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        c_skip, c_out, c_in = (c.view(shape) for c in self.scaling(self.alpha_cumprod_sqrt[idx]))
        c_noise = idx if timesteps is None else timesteps
        out = network(x_t * c_in, c_noise, cond, **model_kwargs)
        ctx = model_kwargs.get("ctx")
        if ctx is not None and ctx.expand is not None:  # the network duplicated rows mid-way
            rows = ctx.expand.rows.to(x_t.device)
            x_t, c_skip, c_out = x_t[rows], c_skip[rows], c_out[rows]
        return out * c_out + x_t * c_skip
