"""Denoising loss: per-sample w(a)·‖D(x_t) − x0‖², which for the default weighting is the v-MSE (SPEC §3)."""

import torch

from vdm.errors import BadInput

from .weighting import VWeighting

LOSS_TYPES = ("l2", "l1")


class VideoDiffusionLoss:
    def __init__(
        self,
        timestep_sampler,
        weighting=None,
        offset_noise_level: float = 0.0,
        min_snr_value: float | None = None,
        loss_type: str = "l2",
    ):
        if loss_type not in LOSS_TYPES:
            raise BadInput(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        self.timestep_sampler = timestep_sampler
        self.weighting = weighting if weighting is not None else VWeighting()
        self.offset_noise_level = offset_noise_level
        self.min_snr_value = min_snr_value
        self.loss_type = loss_type

    def __call__(self, network, denoiser, conditioner, x0, batch, noise=None, idx=None) -> torch.Tensor:
        cond = conditioner(batch)

        x0 = x0.float()
        B = x0.shape[0]
        idx = self.timestep_sampler(B, device=x0.device) if idx is None else idx.to(x0.device)
        a = denoiser.alpha_cumprod_sqrt[idx]  # (B,) float32
        eps = torch.randn_like(x0) if noise is None else noise.float()
        if self.offset_noise_level > 0:
            # one offset per sample, shared by every frame, channel and pixel
            eps = eps + self.offset_noise_level * torch.randn((B,) + (1,) * (x0.ndim - 1), device=x0.device)

        a_ = a.view((B,) + (1,) * (x0.ndim - 1))
        x_t = a_ * x0 + (1 - a_**2).sqrt() * eps
        x0_hat = denoiser(network, x_t, a, cond, timesteps=idx)

        w = self.weighting(a)
        if self.min_snr_value is not None:
            w = torch.clamp(w, max=self.min_snr_value)
        err = (x0_hat - x0) ** 2 if self.loss_type == "l2" else (x0_hat - x0).abs()
        return w * err.flatten(1).mean(dim=1)
