"""DDIM inversion: a sampling grid walked backwards, from a clean latent to the noise DDIM would sample it from.

Sampling step i of a `Grid` takes x_i at a_i to x_{i+1} = a_{i+1}·D + s_{i+1}·eps, with D = denoise(x_i, step i),
eps = (x_i − a_i·D)/s_i and s = sqrt(1 − a²) (`ddim_step`). Inversion undoes the steps in reverse order with the
same step's denoiser evaluated at the point it has, x_{i+1} (the one approximation, x_i ≈ x_{i+1}, as in
diffusers' DDIMInverseScheduler and CogVideo's ddim_inversion.py):

    x_i = a_i·D + s_i·(x_{i+1} − a_{i+1}·D)/s_{i+1},   D = denoise(x_{i+1}, step i)

which is `ddim_step(x_{i+1}, D, a_{i+1}, a_i)`: for a denoiser whose estimate does not depend on its input it is
the exact inverse of the sampling step. The grid's last step lands on a_n = 1 (x_n = D: it keeps nothing of
x_{n−1}), so it cannot be undone; inversion takes the clean latent itself as x_{n−1} (the step's s_{n−1} is the
grid's smallest noise level) and inverts the n − 1 steps before it. Fixed-point iterations (`iterations`) remove
the approximation step by step, at one denoiser call each. Guidance is the caller's choice: inversion is
near-exact only without it (the guided D depends on x more strongly).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .samplers import Denoise, Grid, ddim_step


def invert_ddim(denoise: Denoise, x0: torch.Tensor, grid: Grid, iterations: int = 0,
                verbose: bool = False) -> torch.Tensor:
    """The noise at `grid`'s first level (a_0) from which DDIM sampling over `grid` returns about `x0`:
    the grid's steps undone last to first (`denoise(x, step) -> D` at each step's own timestep).

    `iterations` > 0 refines each step by fixed-point iteration: D is evaluated again at the x_i found so far
    and x_i recomputed, `iterations` times. A fixed point x_i = ddim_step(x_{i+1}, D(x_i), a_{i+1}, a_i) is the
    exact inverse of the sampling step, whose D is evaluated at x_i; each iteration costs one more denoiser call."""
    x = x0
    for i in tqdm(range(len(grid) - 1, -1, -1), desc="DDIM inversion", disable=not verbose):
        step = grid.step(i)
        a_from = grid.next_alpha(step)
        if a_from >= 1.0:  # the step onto a = 1 kept nothing of its input: the clean latent stands for x_{n-1}
            continue
        x_i = ddim_step(x, denoise(x, step), a_from, step.a)
        for _ in range(iterations):
            x_i = ddim_step(x, denoise(x_i, step), a_from, step.a)
        x = x_i
    return x
