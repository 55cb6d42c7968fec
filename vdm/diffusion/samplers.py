"""Samplers over the n-step grid a_0 = 0 < a_1 < … < a_{n−1} < a_n = 1 (SPEC §4).

All share one call signature, ``sampler(denoise, x, cond, uc=None, num_steps=None, generator=None,
**model_kwargs) -> x0``, where ``denoise(x, alpha_cumprod_sqrt (B,), cond, step_idx=i, timesteps=t (B,), **model_kwargs)``
returns x0_hat. Step i maps a_i -> a_{i+1} using the model at DDPM timestep t_i (999 first). Update
coefficients are computed as Python floats (float64) from the float64 grid.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from vdm.errors import BadInput

from .discretization import Discretization


def per_row(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Coefficients (B,) or () as x's dtype, broadcastable over `B T C H W`."""
    return c.to(device=x.device, dtype=x.dtype).view((-1,) + (1,) * (x.ndim - 1))


def ddim_ratio(a: torch.Tensor, a_next: torch.Tensor) -> torch.Tensor:
    """r = sqrt((1 − a'²)/(1 − a²)), float64."""
    return ((1 - a_next.double() ** 2) / (1 - a.double() ** 2)).sqrt()


def ddim_step(x: torch.Tensor, D: torch.Tensor, a, a_next) -> torch.Tensor:
    """One deterministic DDIM step from a to a_next with the denoised estimate D (SPEC §4):
    x' = r·x + (a' − a·r)·D, r = sqrt((1 − a'²)/(1 − a²)). `a`, `a_next`: floats, or (B,) tensors (one step per
    row, as distillation takes them); the coefficients are float64, then x's dtype. Sampling, distillation
    and inversion (a_next < a) share it."""
    a, a_next = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(a_next, dtype=torch.float64)
    r = ddim_ratio(a, a_next)
    return per_row(r, x) * x + per_row(a_next - a * r, x) * D


def log_snr(a: float) -> float:
    """λ = log(a/sqrt(1−a²)), with λ(0) = −inf and λ(1) = +inf."""
    if a <= 0.0:
        return -math.inf
    if a >= 1.0:
        return math.inf
    return math.log(a / math.sqrt(1 - a * a))


@dataclass(frozen=True)
class GridSampler:
    """Shared parts: the grid, the guided denoiser call, the noise draw and the progress bar.

    Immutable: a variant is `dataclasses.replace(sampler, num_steps=..., ...)`, never a mutated copy."""

    discretization: Discretization
    guider: Any
    num_steps: int = 50
    verbose: bool = False
    share_noise_across_batch: bool = False

    def __post_init__(self):
        self.discretization.timesteps(self.num_steps)  # validates num_steps

    def sampling_grid(self, num_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (n,) descending, alpha_cumprod_sqrt (n+1,) float64 ascending from 0 with a_n = 1)."""
        timesteps, a = self.discretization.schedule(self.num_steps if num_steps is None else num_steps)
        return timesteps.flip(0), torch.cat([a.flip(0), a.new_ones(1)])

    def steps(self, num_steps: int):
        return tqdm(range(num_steps), desc=type(self).__name__, disable=not self.verbose)

    def denoise_guided(
        self, denoise, x, a: float, timestep: int, step_idx: int, num_steps: int, cond, uc, model_kwargs
    ):
        a_in = torch.full((x.shape[0],), a, dtype=x.dtype, device=x.device)
        x_in, a_in, cond_in = self.guider.prepare_inputs(x, a_in, cond, uc)
        t_in = torch.full((x_in.shape[0],), timestep, dtype=torch.long, device=x.device)
        x0_hat = denoise(x_in, a_in, cond_in, step_idx=step_idx, timesteps=t_in, **model_kwargs)
        return self.guider(x0_hat, timestep=timestep, step_idx=step_idx, num_steps=num_steps)

    def noise_like(self, x, generator=None):
        """Fresh noise shaped like x. `generator` may be a list with one generator per batch row, so each
        row's noise depends on its own seed only, never on the batch it was sampled in."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != x.shape[0] and not self.share_noise_across_batch:
                raise BadInput(f"{len(generator)} generators for a batch of {x.shape[0]} rows; give one per row")
            rows = generator[:1] if self.share_noise_across_batch else generator
            z = torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in rows])
            return z.expand_as(x)
        if self.share_noise_across_batch:  # one draw for the whole batch (single-prompt reference, editing)
            z = torch.randn(x.shape[1:], generator=generator, device=x.device, dtype=x.dtype)
            return z.expand_as(x)
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class VideoDDIMSampler(GridSampler):
    """Deterministic DDIM: x <- sqrt((1−a'²)/(1−a²))·x + (a' − a·sqrt((1−a'²)/(1−a²)))·D."""

    def __call__(self, denoise, x, cond, uc=None, num_steps=None, generator=None, **model_kwargs):
        timesteps, a = self.sampling_grid(num_steps)
        n, uc = len(timesteps), cond if uc is None else uc
        for i in self.steps(n):
            a_cur, a_next = a[i].item(), a[i + 1].item()
            D = self.denoise_guided(denoise, x, a_cur, int(timesteps[i]), i, n, cond, uc, model_kwargs)
            x = ddim_step(x, D, a_cur, a_next)
        return x


@dataclass(frozen=True)
class VPSDEDPMPP2MSampler(GridSampler):
    """Stochastic DPM-Solver++(2M) in data prediction (the CogVideoX default).

    ``double_draw=True`` draws the noise twice on second-order steps and uses the second draw, as the
    reference multi-prompt sampler and diffusers' CogVideoXDPMScheduler do.
    """

    double_draw: bool = False

    def __call__(self, denoise, x, cond, uc=None, num_steps=None, generator=None, **model_kwargs):
        timesteps, a = self.sampling_grid(num_steps)
        n, uc = len(timesteps), cond if uc is None else uc
        D_prev = None
        for i in self.steps(n):
            a_cur, a_next = a[i].item(), a[i + 1].item()
            D = self.denoise_guided(denoise, x, a_cur, int(timesteps[i]), i, n, cond, uc, model_kwargs)
            if i == n - 1:  # a_n = 1: the data end
                return D
            lam, lam_next = log_snr(a_cur), log_snr(a_next)
            h = lam_next - lam
            m1 = math.sqrt((1 - a_next**2) / (1 - a_cur**2)) * math.exp(-h)
            m2 = math.expm1(-2 * h) * a_next
            sigma = math.sqrt(1 - a_next**2) * math.sqrt(-math.expm1(-2 * h))
            if D_prev is not None and a_next > 0:
                r = (lam - log_snr(a[i - 1].item())) / h  # inf after the a = 0 step: first order again
                D_2 = (1 + 1 / (2 * r)) * D - (1 / (2 * r)) * D_prev
                if self.double_draw:
                    self.noise_like(x, generator)
            else:
                D_2 = D
            x = m1 * x - m2 * D_2 + sigma * self.noise_like(x, generator)
            D_prev = D
        return x


class VPODEDPMPP2MSampler(GridSampler):
    """Deterministic DPM-Solver++(2M): x <- (σ'/σ)·x − expm1(−h)·a'·D', no noise."""

    def __call__(self, denoise, x, cond, uc=None, num_steps=None, generator=None, **model_kwargs):
        timesteps, a = self.sampling_grid(num_steps)
        n, uc = len(timesteps), cond if uc is None else uc
        D_prev = None
        for i in self.steps(n):
            a_cur, a_next = a[i].item(), a[i + 1].item()
            D = self.denoise_guided(denoise, x, a_cur, int(timesteps[i]), i, n, cond, uc, model_kwargs)
            if i == n - 1:
                return D
            lam, lam_next = log_snr(a_cur), log_snr(a_next)
            h = lam_next - lam
            m1 = math.sqrt((1 - a_next**2) / (1 - a_cur**2))
            m2 = math.expm1(-h) * a_next
            if D_prev is not None and a_next > 0:
                r = (lam - log_snr(a[i - 1].item())) / h
                D_2 = (1 + 1 / (2 * r)) * D - (1 / (2 * r)) * D_prev
            else:
                D_2 = D
            x = m1 * x - m2 * D_2
            D_prev = D
        return x
