"""Discrete DDPM noise schedules in the alpha parametrisation (SPEC §3).

A discretization gives ``alpha_cumprod_sqrt`` (written ``a``: x_t = a·x0 + sqrt(1−a²)·eps) for every
training timestep (``table``, used by the denoiser and the loss) and the n-step sampling grid
(``schedule``, ascending timesteps; the sampler reverses it to run from noise to data).
"""

from abc import ABC, abstractmethod

import numpy as np
import torch

from vdm.errors import BadInput

RESCALES = ("subset", "full")


def scaled_linear_alphas_cumprod(linear_start: float, linear_end: float, num_timesteps: int) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s) with β from a linspace of sqrt(β), in float64."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(a: torch.Tensor) -> torch.Tensor:
    """Affinely map ascending-timestep ``a`` so its last entry becomes exactly 0 and its first is unchanged."""
    a_first, a_last = a[0], a[-1]
    if a_first == a_last:  # a one-step grid is the terminal step alone: pure noise
        return torch.zeros_like(a)
    return (a - a_last) * a_first / (a_first - a_last)


class Discretization(ABC):
    """``table()`` -> a for timesteps 0..T−1; ``schedule(n)`` -> (timesteps ascending, a at them)."""

    num_timesteps: int

    @abstractmethod
    def table(self) -> torch.Tensor:
        """(T,) float64 alpha_cumprod_sqrt indexed by timestep."""

    @abstractmethod
    def schedule(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (n,) int64 ascending, alpha_cumprod_sqrt (n,) float64)."""

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """Trailing spacing as in SAT: int(linspace(T−1, 0, n, endpoint=False)) reversed (n=50: 19, 39, …, 999)."""
        T = self.num_timesteps
        if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
            raise BadInput(f"num_steps must be an int in 1..{T}, got {num_steps!r}")
        t = np.linspace(T - 1, 0, num_steps, endpoint=False).astype(np.int64)[::-1]
        return torch.from_numpy(t.copy())


class ZeroSNRDDPM(Discretization):
    """Scaled-linear DDPM with SNR shift ᾱ/(s + (1−s)·ᾱ) and zero terminal SNR (CogVideoX: s = 3).

    ``rescale="subset"`` (SAT) rescales a over the n sampled timesteps; ``rescale="full"`` (diffusers'
    CogVideoX schedulers) rescales the full T-step table and indexes it. ``table()`` is always the full rescale.
    """

    def __init__(
        self,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        num_timesteps: int = 1000,
        shift_scale: float = 1.0,
        rescale: str = "subset",
    ):
        if rescale not in RESCALES:
            raise BadInput(f"rescale must be one of {RESCALES}, got {rescale!r}")
        self.num_timesteps = num_timesteps
        self.rescale = rescale
        alphas_cumprod = scaled_linear_alphas_cumprod(linear_start, linear_end, num_timesteps)
        self.alphas_cumprod = alphas_cumprod / (shift_scale + (1 - shift_scale) * alphas_cumprod)

    def table(self) -> torch.Tensor:
        return rescale_zero_terminal_snr(self.alphas_cumprod.sqrt())

    def schedule(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        timesteps = self.timesteps(num_steps)
        if self.rescale == "full":
            return timesteps, self.table()[timesteps]
        return timesteps, rescale_zero_terminal_snr(self.alphas_cumprod[timesteps].sqrt())


class LegacyDDPM(Discretization):
    """Plain scaled-linear DDPM: no SNR shift, no zero-SNR rescale (terminal a is small but > 0)."""

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.012, num_timesteps: int = 1000):
        self.num_timesteps = num_timesteps
        self.alphas_cumprod = scaled_linear_alphas_cumprod(linear_start, linear_end, num_timesteps)

    def table(self) -> torch.Tensor:
        return self.alphas_cumprod.sqrt()

    def schedule(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        timesteps = self.timesteps(num_steps)
        return timesteps, self.table()[timesteps]
