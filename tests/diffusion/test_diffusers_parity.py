"""Parity with diffusers' CogVideoX schedulers, which use the full-table zero-SNR rescale (SPEC §3)."""

import functools
import math

import pytest
import torch

from vdm.diffusion import (
    DiscreteDenoiser,
    DynamicCFG,
    IdentityGuider,
    VideoDDIMSampler,
    VideoScaling,
    VPSDEDPMPP2MSampler,
    ZeroSNRDDPM,
)

diffusers = pytest.importorskip("diffusers")

SCHEDULER_KWARGS = dict(
    rescale_betas_zero_snr=True,
    snr_shift_scale=3.0,
    timestep_spacing="trailing",
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="v_prediction",
    set_alpha_to_one=True,
    clip_sample=False,
)
SHAPE = (2, 3, 4, 5, 6)  # B T C H W


def fake_network(x, timesteps, cond, **kwargs):
    """A fixed v-prediction that depends on x, the timestep and the condition."""
    t = timesteps.to(x.dtype).view(-1, 1, 1, 1, 1) / 1000
    return 0.3 * x + cond["crossattn"] * t - 0.2 * cond["crossattn"]


def test_table_and_timesteps_match_diffusers():
    scheduler = diffusers.CogVideoXDDIMScheduler(**SCHEDULER_KWARGS)
    scheduler.set_timesteps(50)
    d = ZeroSNRDDPM(shift_scale=3.0, rescale="full")
    torch.testing.assert_close(d.table(), scheduler.alphas_cumprod.double().sqrt(), rtol=0, atol=1e-12)
    t, a = d.schedule(50)
    assert t.flip(0).tolist() == scheduler.timesteps.tolist()
    torch.testing.assert_close(a, scheduler.alphas_cumprod.double().sqrt()[t], rtol=0, atol=1e-12)


def test_ddim_matches_diffusers_over_50_steps():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(SHAPE, generator=g)
    cond = {"crossattn": torch.randn(SHAPE, generator=g)}

    scheduler = diffusers.CogVideoXDDIMScheduler(**SCHEDULER_KWARGS)
    scheduler.set_timesteps(50)
    x_ref = x_T.clone()
    for t in scheduler.timesteps:
        v = fake_network(x_ref, t.expand(SHAPE[0]), cond)
        x_ref = scheduler.step(v, t, x_ref, return_dict=False)[0]

    seen = []

    def network(x, timesteps, cond, **kwargs):
        seen.append(timesteps.tolist())
        return fake_network(x, timesteps, cond)

    discretization = ZeroSNRDDPM(shift_scale=3.0, rescale="full")
    denoiser = DiscreteDenoiser(discretization, VideoScaling())
    sampler = VideoDDIMSampler(discretization, IdentityGuider(), num_steps=50)
    x = sampler(functools.partial(denoiser, network), x_T.clone(), cond)
    assert seen == [[t] * SHAPE[0] for t in scheduler.timesteps.tolist()]
    torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-5)


def test_sde_dpmpp_with_dynamic_cfg_matches_diffusers_pipeline_loop():
    """CogVideoXDPMScheduler draws noise twice on second-order steps: our double_draw=True."""
    n, scale = 50, 6.0
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(SHAPE, generator=g)
    cond = {"crossattn": torch.randn(SHAPE, generator=g)}
    uc = {"crossattn": torch.zeros(SHAPE)}

    # the diffusers CogVideoXPipeline loop, guidance applied on the v-prediction
    scheduler = diffusers.CogVideoXDPMScheduler(**SCHEDULER_KWARGS)
    scheduler.set_timesteps(n)
    ts = scheduler.timesteps
    x_ref, old_x0, gen = x_T.clone(), None, torch.Generator().manual_seed(7)
    for i, t in enumerate(ts):
        ctx = {"crossattn": torch.cat([uc["crossattn"], cond["crossattn"]])}
        v_u, v_c = fake_network(torch.cat([x_ref] * 2), t.expand(2 * SHAPE[0]), ctx).chunk(2)
        w = 1 + scale * ((1 - math.cos(math.pi * ((n - t.item()) / n) ** 5.0)) / 2)
        v = v_u + w * (v_c - v_u)
        x_ref, old_x0 = scheduler.step(v, old_x0, t, ts[i - 1] if i > 0 else None, x_ref, generator=gen)

    discretization = ZeroSNRDDPM(shift_scale=3.0, rescale="full")
    denoiser = DiscreteDenoiser(discretization, VideoScaling())
    sampler = VPSDEDPMPP2MSampler(discretization, DynamicCFG(scale, exp=5.0), num_steps=n, double_draw=True)
    x = sampler(
        functools.partial(denoiser, fake_network),
        x_T.clone(),
        cond,
        uc,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-5)

    # the single-draw default follows a different noise path
    x_single = VPSDEDPMPP2MSampler(discretization, DynamicCFG(scale, exp=5.0), num_steps=n)(
        functools.partial(denoiser, fake_network),
        x_T.clone(),
        cond,
        uc,
        generator=torch.Generator().manual_seed(7),
    )
    assert (x_single - x_ref).abs().max() > 1e-3
