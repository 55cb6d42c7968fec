"""Samplers over a grid they are given (SPEC §4), in k-diffusion's shape.

A `Grid` is n steps: step i maps a_i -> a_{i+1} (alpha_cumprod_sqrt, float64) with the network at DDPM
timestep t_i. The sampling grid of a discretization runs a_0 = 0 < a_1 < … < a_n = 1 with t_0 = 999; any
other order (inversion walks it backwards) is a Grid too.

The sampler functions — `sample_ddim`, `sample_dpmpp_2m`, `sample_dpmpp_2m_sde` — take
`denoise(x, step) -> D`, the denoised estimate of x at `step` (a `Step`: index, count, a and timestep),
and know nothing of guidance, prompts or attention: those are wrappers around the denoiser
(`GuidedDenoiser` here, `vdm.diffusion.multi_prompt.MultiPromptDenoiser` for long videos). Update
coefficients are Python floats (float64) from the float64 grid.

The classes `VideoDDIMSampler`, `VPSDEDPMPP2MSampler` and `VPODEDPMPP2MSampler` are the frozen configs
Hydra builds (`conf/sampler/`): discretization, guider, step count, noise sharing and progress bar. Called
as `sampler(model_denoise, x, cond, uc=None, num_steps=None, generator=None, **model_kwargs)`, with
`model_denoise(x, a (B,), cond, step_idx=i, timesteps=t (B,), **model_kwargs) -> D` (the engine's
preconditioned network), they wrap it in a `GuidedDenoiser` and run their function on their grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
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


# -- the grid ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """n steps: step i goes from `alphas[i]` to `alphas[i + 1]` with the network at `timesteps[i]`.

    timesteps: (n,) long. alphas: (n + 1,) float64 alpha_cumprod_sqrt."""

    timesteps: torch.Tensor
    alphas: torch.Tensor

    def __post_init__(self):
        if self.timesteps.ndim != 1 or self.alphas.shape != (len(self.timesteps) + 1,):
            raise BadInput(f"a grid of {len(self.timesteps)} timesteps needs {len(self.timesteps) + 1} alphas, "
                           f"got shape {tuple(self.alphas.shape)}")

    @classmethod
    def of(cls, discretization: Discretization, num_steps: int) -> Grid:
        """The sampling grid from noise to data: timesteps descending (999 first), a from 0 up to a_n = 1."""
        timesteps, a = discretization.schedule(num_steps)
        return cls(timesteps.flip(0), torch.cat([a.flip(0), a.new_ones(1)]))

    def __len__(self) -> int:
        return len(self.timesteps)

    def last(self, k: int) -> Grid:
        """The last `k` steps (video-to-video starts there, from its input noised to alphas[n − k])."""
        if not 1 <= k <= len(self):
            raise BadInput(f"{k} steps of a {len(self)}-step grid: keep between 1 and {len(self)}")
        return Grid(self.timesteps[len(self) - k:], self.alphas[len(self) - k:])

    def step(self, i: int) -> Step:
        return Step(i, len(self), self.alphas[i].item(), int(self.timesteps[i]))

    def steps(self, desc: str = "sampling", verbose: bool = False):
        """Steps 0..n−1 in order, with a progress bar when `verbose`."""
        return (self.step(i) for i in tqdm(range(len(self)), desc=desc, disable=not verbose))

    def next_alpha(self, step: Step) -> float:
        return self.alphas[step.idx + 1].item()

    def previous_alpha(self, step: Step) -> float:
        return self.alphas[step.idx - 1].item()


@dataclass(frozen=True)
class Step:
    """Where one denoiser call is: step `idx` of `num_steps`, at noise level `a` and network `timestep`."""

    idx: int
    num_steps: int
    a: float
    timestep: int


Denoise = Callable[[torch.Tensor, Step], torch.Tensor]


# -- the sampler functions -------------------------------------------------------------------------

def sample_ddim(denoise: Denoise, x: torch.Tensor, grid: Grid, verbose: bool = False) -> torch.Tensor:
    """Deterministic DDIM: x <- r·x + (a' − a·r)·D at every step (`ddim_step`)."""
    for step in grid.steps("DDIM", verbose):
        x = ddim_step(x, denoise(x, step), step.a, grid.next_alpha(step))
    return x


def _second_order(D, D_prev, lam: float, lam_prev: float, h: float):
    r = (lam - lam_prev) / h  # inf after the a = 0 step: first order again
    return (1 + 1 / (2 * r)) * D - (1 / (2 * r)) * D_prev


def sample_dpmpp_2m(denoise: Denoise, x: torch.Tensor, grid: Grid, verbose: bool = False) -> torch.Tensor:
    """Deterministic DPM-Solver++(2M): x <- (σ'/σ)·x − expm1(−h)·a'·D', no noise. The last step (a_n = 1)
    returns its D."""
    D_prev = None
    for step in grid.steps("DPM++(2M)", verbose):
        a_cur, a_next = step.a, grid.next_alpha(step)
        D = denoise(x, step)
        if step.idx == len(grid) - 1:
            return D
        lam, lam_next = log_snr(a_cur), log_snr(a_next)
        h = lam_next - lam
        m1 = math.sqrt((1 - a_next**2) / (1 - a_cur**2))
        m2 = math.expm1(-h) * a_next
        use_prev = D_prev is not None and a_next > 0
        D_2 = _second_order(D, D_prev, lam, log_snr(grid.previous_alpha(step)), h) if use_prev else D
        x = m1 * x - m2 * D_2
        D_prev = D
    return x


def sample_dpmpp_2m_sde(denoise: Denoise, x: torch.Tensor, grid: Grid, noise: Callable[[torch.Tensor], torch.Tensor],
                        double_draw: bool = False, verbose: bool = False) -> torch.Tensor:
    """Stochastic DPM-Solver++(2M) in data prediction (the CogVideoX default). `noise(x)`: fresh noise like
    x. `double_draw=True` draws it twice on second-order steps and uses the second draw, as the reference
    multi-prompt sampler and diffusers' CogVideoXDPMScheduler do. The last step (a_n = 1) returns its D."""
    D_prev = None
    for step in grid.steps("DPM++(2M) SDE", verbose):
        a_cur, a_next = step.a, grid.next_alpha(step)
        D = denoise(x, step)
        if step.idx == len(grid) - 1:  # a_n = 1: the data end
            return D
        lam, lam_next = log_snr(a_cur), log_snr(a_next)
        h = lam_next - lam
        m1 = math.sqrt((1 - a_next**2) / (1 - a_cur**2)) * math.exp(-h)
        m2 = math.expm1(-2 * h) * a_next
        sigma = math.sqrt(1 - a_next**2) * math.sqrt(-math.expm1(-2 * h))
        if D_prev is not None and a_next > 0:
            D_2 = _second_order(D, D_prev, lam, log_snr(grid.previous_alpha(step)), h)
            if double_draw:
                noise(x)
        else:
            D_2 = D
        x = m1 * x - m2 * D_2 + sigma * noise(x)
        D_prev = D
    return x


# -- guidance around the denoiser ------------------------------------------------------------------

@dataclass(frozen=True)
class GuidedDenoiser:
    """`(x, step) -> D` of a guided model call: the guider builds the batch (`prepare_inputs`, CFG rows
    `[uc..., c...]`) and combines the outputs. `model_kwargs` (the per-call context `ctx`, ...) go to
    `model_denoise` unchanged. `branches` (CFG parallelism, `vdm.distributed.Processes`): each process evaluates
    one guidance branch's rows and all_gather brings every branch to every process, which combine them alike."""

    model_denoise: Callable
    guider: Any
    cond: dict
    uc: dict
    model_kwargs: dict = field(default_factory=dict)
    branches: Any = None

    def __call__(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        a_in = torch.full((x.shape[0],), step.a, dtype=x.dtype, device=x.device)
        x_in, a_in, cond_in = self.guider.prepare_inputs(x, a_in, self.cond, self.uc)
        t_in = torch.full((x_in.shape[0],), step.timestep, dtype=torch.long, device=x.device)
        if self.branches is None or self.branches.world_size == 1:
            D = self.model_denoise(x_in, a_in, cond_in, step_idx=step.idx, timesteps=t_in, **self.model_kwargs)
        else:
            blocks = self.branches.blocks(x_in.shape[0])  # branch b's rows on process b
            rows = slice(blocks[self.branches.rank].start, blocks[self.branches.rank].stop)
            local = self.model_denoise(x_in[rows], a_in[rows], {k: v[rows] for k, v in cond_in.items()},
                                       step_idx=step.idx, timesteps=t_in[rows], **self.model_kwargs)
            D = self.branches.gather(local.contiguous(), [len(b) for b in blocks])
        return self.guider(D, timestep=step.timestep, step_idx=step.idx, num_steps=step.num_steps)


# -- the configs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GridSampler:
    """A sampler config: the discretization whose grid it walks, the guider, the step count, whether the
    batch shares its noise, and the progress bar. Subclasses name their function in `run`.

    Immutable: a variant is `dataclasses.replace(sampler, num_steps=..., ...)`, never a mutated copy."""

    discretization: Discretization
    guider: Any
    num_steps: int = 50
    verbose: bool = False
    share_noise_across_batch: bool = False
    branches: Any = None  # cfg_parallel: the processes the guidance branches are split over (GuidedDenoiser)

    def __post_init__(self):
        self.discretization.timesteps(self.num_steps)  # validates num_steps

    def grid(self, num_steps: int | None = None) -> Grid:
        return Grid.of(self.discretization, self.num_steps if num_steps is None else num_steps)

    def sampling_grid(self, num_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (n,) descending, alpha_cumprod_sqrt (n+1,) float64 ascending from 0 with a_n = 1)."""
        grid = self.grid(num_steps)
        return grid.timesteps, grid.alphas

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

    def __call__(self, model_denoise, x, cond, uc=None, num_steps=None, generator=None, grid: Grid | None = None,
                 **model_kwargs):
        """Sample from x over `grid` (this sampler's `num_steps` grid when None)."""
        denoise = GuidedDenoiser(model_denoise, self.guider, cond, cond if uc is None else uc, model_kwargs,
                                 self.branches)
        return self.run(denoise, x, self.grid(num_steps) if grid is None else grid, generator)

    def run(self, denoise: Denoise, x: torch.Tensor, grid: Grid, generator=None) -> torch.Tensor:
        """This sampler's function over `grid`, for any denoiser `(x, step) -> D`."""
        raise NotImplementedError


class VideoDDIMSampler(GridSampler):
    """Deterministic DDIM (`sample_ddim`)."""

    def run(self, denoise, x, grid, generator=None):
        return sample_ddim(denoise, x, grid, self.verbose)


@dataclass(frozen=True)
class VPSDEDPMPP2MSampler(GridSampler):
    """Stochastic DPM-Solver++(2M) (`sample_dpmpp_2m_sde`), its noise from `generator` (a list: one per row)."""

    double_draw: bool = False

    def run(self, denoise, x, grid, generator=None):
        return sample_dpmpp_2m_sde(denoise, x, grid, lambda like: self.noise_like(like, generator),
                                   self.double_draw, self.verbose)


class VPODEDPMPP2MSampler(GridSampler):
    """Deterministic DPM-Solver++(2M) (`sample_dpmpp_2m`)."""

    def run(self, denoise, x, grid, generator=None):
        return sample_dpmpp_2m(denoise, x, grid, self.verbose)
