import pytest
import torch

from vdm.diffusion import (
    DiscreteDenoiser,
    EpsScaling,
    LegacyDDPM,
    VideoScaling,
    VScaling,
    X0Scaling,
    ZeroSNRDDPM,
)


def forward_process(B=3):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    a = torch.tensor([0.2, 0.6, 0.95], dtype=torch.float64)
    a_ = a.view(-1, 1, 1, 1, 1)
    return x0, eps, a, a_, a_ * x0 + (1 - a_**2).sqrt() * eps


@pytest.mark.parametrize(
    "scaling,target", [(VideoScaling(), "v"), (EpsScaling(), "eps"), (X0Scaling(), "x0")]
)
def test_scalings_recover_x0_from_their_target(scaling, target):
    x0, eps, a, a_, x_t = forward_process()
    F = {"v": a_ * eps - (1 - a_**2).sqrt() * x0, "eps": eps, "x0": x0}[target]
    c_skip, c_out, c_in = (c.view(-1, 1, 1, 1, 1) for c in scaling(a))
    assert (c_in == 1).all()
    torch.testing.assert_close(c_skip * x_t + c_out * F, x0)


def test_vscaling_is_sgm_sigma_space_vscaling():
    """sgm's VScaling acts on x_σ = x_t/a with σ = sqrt(1−a²)/a; in alpha space it is VideoScaling."""
    assert VScaling is VideoScaling
    _, _, a, a_, x_t = forward_process()
    sigma = (1 - a_**2).sqrt() / a_
    F = torch.sin  # any network
    x_sigma = x_t / a_
    d_sgm = x_sigma / (sigma**2 + 1) - sigma / (sigma**2 + 1).sqrt() * F(x_sigma / (sigma**2 + 1).sqrt())
    c_skip, c_out, c_in = (c.view(-1, 1, 1, 1, 1) for c in VideoScaling()(a))
    torch.testing.assert_close(c_skip * x_t + c_out * F(c_in * x_t), d_sgm)


def test_discrete_denoiser_snaps_to_the_table():
    d = ZeroSNRDDPM(shift_scale=3.0)
    denoiser = DiscreteDenoiser(d, VideoScaling())
    table = denoiser.alpha_cumprod_sqrt
    assert table.dtype == torch.float32 and table.shape == (1000,)
    torch.testing.assert_close(table, d.table().float())

    idx = torch.tensor([0, 19, 500, 999])
    a_off = table[idx] + torch.tensor([1e-5, -2e-5, 3e-5, 1e-5])  # off the table, nearest entry unchanged
    assert torch.equal(denoiser.idx_from_alpha(a_off), idx)

    seen = []

    def network(x, timesteps, cond, **kwargs):
        seen.append((timesteps, cond, kwargs))
        return torch.ones_like(x)

    x_t = torch.randn(4, 2, 3, 4, 4)
    out = denoiser(network, x_t, a_off, {"crossattn": 1}, step_idx=7)
    timesteps, cond, kwargs = seen[0]
    assert timesteps.dtype == torch.int64 and torch.equal(timesteps, idx)
    assert cond == {"crossattn": 1} and kwargs == {"step_idx": 7}
    a_tab = table[idx].view(-1, 1, 1, 1, 1)  # coefficients use table values, not the incoming a
    torch.testing.assert_close(out, a_tab * x_t - (1 - a_tab**2).sqrt(), rtol=0, atol=1e-6)


def test_subset_grid_snaps_within_one_timestep():
    """SAT's subset-rescaled grid is slightly off the full-rescale table: the snapped index can differ by 1."""
    denoiser = DiscreteDenoiser(ZeroSNRDDPM(shift_scale=3.0), VideoScaling())
    t, a = ZeroSNRDDPM(shift_scale=3.0).schedule(50)
    idx = denoiser.idx_from_alpha(a.float())
    assert (idx - t).abs().max().item() == 1 and idx[-1].item() == 999


def test_denoiser_is_a_module_with_a_buffer():
    denoiser = DiscreteDenoiser(LegacyDDPM(), EpsScaling())
    assert "alpha_cumprod_sqrt" in dict(denoiser.named_buffers())
    assert denoiser.to(torch.float64).alpha_cumprod_sqrt.dtype == torch.float64


def test_num_idx_must_match():
    with pytest.raises(ValueError, match="num_idx must equal discretization.num_timesteps=1000"):
        DiscreteDenoiser(ZeroSNRDDPM(), VideoScaling(), num_idx=500)


def test_eps_scaling_is_refused_at_zero_terminal_snr():
    with pytest.raises(ValueError, match="scaling EpsScaling is not finite at timestep 999"):
        DiscreteDenoiser(ZeroSNRDDPM(), EpsScaling())
