import functools
import math

import pytest
import torch

from vdm.diffusion import (
    DiscreteDenoiser,
    IdentityGuider,
    VanillaCFG,
    VideoDDIMSampler,
    VideoScaling,
    VPODEDPMPP2MSampler,
    VPSDEDPMPP2MSampler,
    ZeroSNRDDPM,
)

SAMPLERS = [VideoDDIMSampler, VPSDEDPMPP2MSampler, VPODEDPMPP2MSampler]
DISC = ZeroSNRDDPM(shift_scale=3.0)


class RecordingGuider(IdentityGuider):
    def __init__(self):
        self.calls = []

    def __call__(self, x0_hat, timestep, step_idx, num_steps=None):
        self.calls.append((timestep, step_idx, num_steps))
        return x0_hat


def point_mass_denoise(x0, seen):
    """The exact denoiser when the data distribution is the single point x0; records its inputs."""

    def denoise(x, a, cond, step_idx, timesteps, **model_kwargs):
        seen.append((x.clone(), a.clone(), step_idx, model_kwargs, timesteps))
        return x0.expand_as(x)

    return denoise


def test_sampling_grid():
    timesteps, a = VideoDDIMSampler(DISC, IdentityGuider()).sampling_grid(50)
    assert timesteps.tolist() == list(range(999, 0, -20))
    assert a.shape == (51,) and a[0].item() == 0.0 and a[-1].item() == 1.0
    assert (a[1:] > a[:-1]).all()
    torch.testing.assert_close(a[:-1], DISC.schedule(50)[1].flip(0))


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_point_mass_oracle_stays_on_the_forward_marginals(sampler_cls):
    """With D = x0 every step must keep x_i = a_i·x0 + sqrt(1−a_i²)·eps_i, eps_i ~ N(0, I), and end at x0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 3, 4, 16, 16, generator=g, dtype=torch.float64)
    x_T = torch.randn(4, 3, 4, 16, 16, generator=g, dtype=torch.float64)
    guider, seen = RecordingGuider(), []
    sampler = sampler_cls(DISC, guider, num_steps=50)
    out = sampler(point_mass_denoise(x0, seen), x_T.clone(), {}, generator=g, extra="kw")
    torch.testing.assert_close(out, x0.expand_as(out), rtol=0, atol=1e-5)

    timesteps, a = sampler.sampling_grid(50)
    assert [c[0] for c in guider.calls] == timesteps.tolist() == list(range(999, 18, -20))
    assert [c[1] for c in guider.calls] == [s[2] for s in seen] == list(range(50))
    assert all(c[2] == 50 for c in guider.calls) and all(s[3] == {"extra": "kw"} for s in seen)
    assert [s[4].tolist() for s in seen] == [[t] * 4 for t in range(999, 18, -20)]  # the grid's own timesteps
    for (x, a_in, _, _, _), a_i in zip(seen, a[:-1].tolist()):
        assert a_in.shape == (4,) and a_in.dtype == x_T.dtype and (a_in == a_i).all()
        assert torch.isfinite(x).all()
        eps = (x - a_i * x0) / math.sqrt(1 - a_i**2)
        if sampler_cls is VPSDEDPMPP2MSampler:  # fresh noise each step: only the marginal is fixed
            assert abs(eps.std().item() - 1) < 0.03 and abs(eps.mean().item()) < 0.03
        else:  # deterministic: the same eps all along the trajectory
            torch.testing.assert_close(eps, x_T, rtol=0, atol=1e-9)


def gaussian_path_error(sampler_cls, s=0.5, n=50):
    """Max deviation from the exact probability-flow ODE path for data ~ N(0, s²):
    x_t = sqrt(a²s² + 1 − a²)·x_T, with exact denoiser D(x, a) = a·s²·x / (a²s² + 1 − a²)."""
    seen = []

    def denoise(x, a, cond, step_idx, **_):
        seen.append((x.item(), a.item()))
        return a * s * s * x / (a * a * s * s + 1 - a * a)

    sampler_cls(DISC, IdentityGuider(), num_steps=n)(denoise, torch.ones(1, dtype=torch.float64), {})
    return max(abs(x - math.sqrt(a * a * s * s + 1 - a * a)) for x, a in seen)


def test_ode_dpmpp_is_second_order_on_a_gaussian():
    err_ddim, err_dpm = gaussian_path_error(VideoDDIMSampler), gaussian_path_error(VPODEDPMPP2MSampler)
    assert err_ddim < 0.03  # first order
    assert err_dpm < err_ddim / 5


def test_shared_noise_and_double_draw():
    x0 = torch.zeros(1, 2, 3, 4, 4)
    x_T = torch.randn(1, 2, 3, 4, 4).expand(3, -1, -1, -1, -1).clone()  # identical rows

    def run(**kwargs):
        sampler = VPSDEDPMPP2MSampler(DISC, IdentityGuider(), num_steps=5, **kwargs)
        seen = []
        sampler(point_mass_denoise(x0, seen), x_T.clone(), {}, generator=torch.Generator().manual_seed(3))
        return seen[-1][0]  # the last step's input carries all the noise drawn so far

    shared, independent = run(share_noise_across_batch=True), run()
    assert (shared == shared[:1]).all()
    assert not torch.allclose(independent[0], independent[1])
    assert not torch.allclose(run(double_draw=True), independent)


def test_cfg_batches_uc_then_c_and_call_num_steps_overrides():
    seen = []
    cond, uc = {"crossattn": torch.ones(2, 1, 1)}, {"crossattn": torch.zeros(2, 1, 1)}

    def denoise(x, a, c, step_idx, **_):
        seen.append((x.shape[0], a.shape[0], c["crossattn"][:, 0, 0].tolist()))
        return x * 0 + c["crossattn"].view(-1, 1, 1, 1, 1)

    out = VideoDDIMSampler(DISC, VanillaCFG(2.0), num_steps=50)(
        denoise, torch.randn(2, 1, 1, 2, 2), cond, uc, num_steps=7
    )
    assert len(seen) == 7 and seen[0] == (4, 4, [0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(out, torch.full_like(out, 2.0))  # 0 + 2·(1 − 0)


def test_works_through_the_discrete_denoiser_and_verbose():
    seen_idx = []

    def network(x, timesteps, cond, step_idx):
        seen_idx.append(timesteps.tolist())
        return torch.zeros_like(x)

    # the SAT "subset" grid snaps one timestep low at some steps; the network still sees the grid's timesteps
    subset = ZeroSNRDDPM(shift_scale=3.0)
    denoise = functools.partial(DiscreteDenoiser(subset, VideoScaling()), network)
    VPSDEDPMPP2MSampler(subset, IdentityGuider(), num_steps=50, verbose=True)(
        denoise, torch.randn(2, 1, 1, 2, 2), {}
    )
    assert seen_idx == [[t, t] for t in range(999, 0, -20)]


@pytest.mark.parametrize("num_steps", [0, 1001])
def test_bad_num_steps(num_steps):
    with pytest.raises(ValueError, match="num_steps must be an int in 1..1000"):
        VideoDDIMSampler(DISC, IdentityGuider(), num_steps=num_steps)
