"""DDIM inversion: the sampling grid walked backwards undoes DDIM sampling exactly for a denoiser whose x0
estimate does not depend on its input, and the guided pair's source row takes its own guidance scale."""

import pytest
import torch

from vdm.diffusion import VanillaCFG, ZeroSNRDDPM
from vdm.diffusion.guiders import EditPairGuidance, IdentityGuider
from vdm.diffusion.inversion import invert_ddim
from vdm.diffusion.samplers import Grid, sample_ddim
from vdm.errors import BadInput


def grid_of(steps: int) -> Grid:
    return Grid.of(ZeroSNRDDPM(shift_scale=3.0), steps)


def fixed_estimates(grid: Grid, shape) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(len(grid))]


@pytest.mark.parametrize("steps", [10, 50])
def test_inversion_is_the_exact_inverse_of_ddim_sampling(steps):
    """noise -> DDIM over the steps before a = 1 -> inversion returns the noise; and a clean latent's inversion
    sampled over the whole grid returns the latent (its last step lands on the estimate, here the latent)."""
    grid, shape = grid_of(steps), (1, 3, 4, 5, 5)
    D = fixed_estimates(grid, shape)
    denoise = lambda x, step: D[step.idx]  # noqa: E731 — an estimate independent of x
    head = Grid(grid.timesteps[:-1], grid.alphas[:-1])  # ends at a_{n-1} < 1
    noise = torch.randn(shape, dtype=torch.float64)
    x = sample_ddim(denoise, noise, head)
    assert (x - noise).abs().max() > 0.1  # it moved
    torch.testing.assert_close(invert_ddim(denoise, x, head), noise, rtol=1e-5, atol=1e-5)

    z = D[-1]  # a latent the last step returns
    inverted = invert_ddim(denoise, z, grid)
    torch.testing.assert_close(sample_ddim(denoise, inverted, head), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample_ddim(denoise, inverted, grid), z, rtol=0, atol=0)


def test_inversion_calls_each_step_but_the_last_once_in_reverse():
    grid = grid_of(10)
    seen = []
    invert_ddim(lambda x, step: seen.append((step.idx, step.timestep)) or torch.zeros_like(x), torch.ones(1, 2), grid)
    assert seen == [(i, int(grid.timesteps[i])) for i in range(8, -1, -1)]


def test_the_edit_pair_guides_its_source_row_at_its_own_scale():
    x_u, x_c = torch.randn(2, 3), torch.randn(2, 3)
    out = EditPairGuidance(VanillaCFG(6.0), 1.0)(torch.cat([x_u, x_c]), timestep=500, step_idx=3, num_steps=10)
    torch.testing.assert_close(out[0], x_c[0])  # the source: the conditional estimate alone
    torch.testing.assert_close(out[1], x_u[1] + 6.0 * (x_c[1] - x_u[1]))  # the target: the job's guidance
    out = EditPairGuidance(VanillaCFG(6.0), 2.5)(torch.cat([x_u, x_c]), timestep=500, step_idx=3, num_steps=10)
    torch.testing.assert_close(out[0], x_u[0] + 2.5 * (x_c[0] - x_u[0]))
    unguided = torch.randn(2, 3)
    assert torch.equal(EditPairGuidance(IdentityGuider())(unguided, 500, 3), unguided)
    with pytest.raises(BadInput, match=r"inversion.source_cfg=3.0 guides the source row, but the job is unguided"):
        EditPairGuidance(IdentityGuider(), 3.0)


def test_fixed_point_iterations_make_the_inversion_exact_for_an_input_dependent_estimate():
    """D = f(step) + 0.3·x: plain inversion evaluates D at the wrong point and misses the noise; iterating each
    step to its fixed point undoes DDIM sampling to 1e-5."""
    grid, shape = grid_of(10), (1, 2, 3, 4, 4)
    head = Grid(grid.timesteps[:-1], grid.alphas[:-1])
    D = fixed_estimates(grid, shape)
    denoise = lambda x, step: D[step.idx] + 0.3 * x  # noqa: E731
    noise = torch.randn(shape, dtype=torch.float64)
    x = sample_ddim(denoise, noise, head)
    plain = (invert_ddim(denoise, x, head) - noise).abs().max()
    assert plain > 1e-2
    refined = (invert_ddim(denoise, x, head, iterations=2) - noise).abs().max()
    assert refined < plain / 4
    torch.testing.assert_close(invert_ddim(denoise, x, head, iterations=40), noise, rtol=1e-5, atol=1e-5)
