import pytest
import torch

from vdm.diffusion import (
    DiscreteDenoiser,
    DiscreteTimestepSampler,
    EpsWeighting,
    UnitWeighting,
    VideoDiffusionLoss,
    VideoScaling,
    VWeighting,
    ZeroSNRDDPM,
)

B, T, C, H, W = 4, 2, 3, 4, 4
IDX = torch.tensor([0, 250, 600, 999])


class LinearNetwork(torch.nn.Module):
    """A toy v-predictor: a channel mix plus a timestep-dependent bias."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weight = torch.nn.Parameter(torch.randn(C, C, generator=g) * 0.5)
        self.seen = []

    def forward(self, x, timesteps, cond, **kwargs):
        self.seen.append((x.clone(), timesteps, cond))
        return torch.einsum("dc,btchw->btdhw", self.weight, x) + (timesteps / 1000).view(-1, 1, 1, 1, 1)


def setup():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(B, T, C, H, W, generator=g), torch.randn(B, T, C, H, W, generator=g)
    denoiser = DiscreteDenoiser(ZeroSNRDDPM(shift_scale=3.0), VideoScaling())
    return x0, eps, denoiser, LinearNetwork()


def conditioner(batch):
    return {"crossattn": batch["txt"]}


BATCH = {"txt": torch.zeros(B, 1, 8)}


def test_loss_is_the_v_prediction_mse():
    x0, eps, denoiser, network = setup()
    loss = VideoDiffusionLoss(DiscreteTimestepSampler())(
        network, denoiser, conditioner, x0, BATCH, noise=eps, idx=IDX
    )
    a = ZeroSNRDDPM(shift_scale=3.0).table()[IDX].view(-1, 1, 1, 1, 1)  # by hand, float64
    x_t = a * x0 + (1 - a**2).sqrt() * eps
    v = a * eps - (1 - a**2).sqrt() * x0
    F = network(x_t.float(), IDX, {}).double()
    expected = ((F - v) ** 2).mean(dim=(1, 2, 3, 4))
    assert loss.shape == (B,)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)


def test_weightings_and_l1():
    x0, eps, denoiser, network = setup()
    a = denoiser.alpha_cumprod_sqrt[IDX]
    x_t = a.view(-1, 1, 1, 1, 1) * x0 + (1 - a.view(-1, 1, 1, 1, 1) ** 2).sqrt() * eps
    err = denoiser(network, x_t, a, {}) - x0
    for weighting, w in [
        (UnitWeighting(), torch.ones(B)),
        (EpsWeighting(), a**2 / (1 - a**2)),
        (VWeighting(), 1 / (1 - a**2)),
    ]:
        for loss_type, e in [("l2", err**2), ("l1", err.abs())]:
            loss_fn = VideoDiffusionLoss(DiscreteTimestepSampler(), weighting=weighting, loss_type=loss_type)
            loss = loss_fn(network, denoiser, conditioner, x0, BATCH, noise=eps, idx=IDX)
            torch.testing.assert_close(loss, w * e.mean(dim=(1, 2, 3, 4)))


def test_min_snr_clamp():
    x0, eps, denoiser, network = setup()
    plain = VideoDiffusionLoss(DiscreteTimestepSampler())(
        network, denoiser, conditioner, x0, BATCH, noise=eps, idx=IDX
    )
    clamped = VideoDiffusionLoss(DiscreteTimestepSampler(), min_snr_value=5.0)(
        network, denoiser, conditioner, x0, BATCH, noise=eps, idx=IDX
    )
    w = 1 / (1 - denoiser.alpha_cumprod_sqrt[IDX] ** 2)
    assert w[0] > 5 and w[-1] < 5  # the clamp bites at idx 0 and not at 999
    torch.testing.assert_close(clamped, plain * torch.clamp(w, max=5.0) / w)


def test_offset_noise_is_one_value_per_sample():
    x0, _, denoiser, network = setup()
    loss_fn = VideoDiffusionLoss(DiscreteTimestepSampler(), offset_noise_level=0.7)
    torch.manual_seed(0)
    loss_fn(network, denoiser, conditioner, torch.zeros_like(x0), BATCH, noise=torch.zeros_like(x0), idx=IDX)
    x_t = network.seen[0][0]  # = sqrt(1−a²)·0.7·z_b for x0 = 0 and zero base noise
    per_sample = x_t.flatten(1)
    assert (per_sample != 0).all()
    assert torch.equal(per_sample, per_sample[:, :1].expand_as(per_sample))
    assert len(set(per_sample[:, 0].tolist())) == B


def test_timesteps_sampled_and_the_conditioners_concat_reaches_the_network():
    x0, _, denoiser, network = setup()
    concat = torch.randn(B, T, C, H, W)
    c = {"crossattn": torch.ones(B, 1, 8), "concat": concat}  # e.g. LowResolutionVideo's latents
    loss = VideoDiffusionLoss(DiscreteTimestepSampler())(network, denoiser, lambda b: c, x0, {})
    assert loss.shape == (B,) and torch.isfinite(loss).all()
    _, timesteps, cond = network.seen[0]
    assert timesteps.shape == (B,) and timesteps.dtype == torch.int64
    assert cond["concat"] is concat and cond["crossattn"] is c["crossattn"]


def test_bad_loss_type():
    with pytest.raises(ValueError, match="loss_type must be one of \\('l2', 'l1'\\), got 'huber'"):
        VideoDiffusionLoss(DiscreteTimestepSampler(), loss_type="huber")
