import math

import pytest
import torch

from vdm.diffusion import DynamicCFG, IdentityGuider, VanillaCFG


def guidance(guider, timestep, step_idx, num_steps=None):
    """The scale g, read off the guider's output for x_u = 0, x_c = 1."""
    x0_hat = torch.cat([torch.zeros(1, 3), torch.ones(1, 3)]).double()
    out = guider(x0_hat, timestep=timestep, step_idx=step_idx, num_steps=num_steps)
    assert out.shape == (1, 3) and (out == out[0, 0]).all()
    return out[0, 0].item()


def reference_dynamic_scale(scale, t, n=50, exp=5.0):
    # CogVideoX SAT / diffusers: u = num_steps − DDPM timestep
    return 1 + scale * (1 - math.cos(math.pi * ((n - t) / n) ** exp)) / 2


@pytest.mark.parametrize("t,scale", [(999, 6.0), (979, 6.0), (519, 3.0), (19, 6.0), (39, 7.5)])
def test_dynamic_cfg_reproduces_reference_formula(t, scale):
    g = guidance(DynamicCFG(scale, exp=5), timestep=t, step_idx=0)
    assert g == pytest.approx(reference_dynamic_scale(scale, t), rel=1e-12)


def test_dynamic_cfg_closed_form_points():
    guider = DynamicCFG(6.0, exp=5.0, num_steps=50)
    assert guidance(guider, timestep=50, step_idx=0) == 1.0  # u = 0
    assert guidance(guider, timestep=0, step_idx=0) == pytest.approx(7.0)  # u = n: cos(π) = −1
    assert guidance(guider, timestep=25, step_idx=0) == pytest.approx(1 + 3 * (1 - math.cos(math.pi / 32)))
    assert guidance(guider, timestep=75, step_idx=0) == pytest.approx(
        1 + 3 * (1 - math.cos(math.pi / 32))
    )  # odd exp


def test_dynamic_cfg_step_index_variant_rises_to_full_scale():
    guider = DynamicCFG(6.0, exp=5.0, num_steps=50, use_step_index=True)
    assert guidance(guider, timestep=999, step_idx=0) == pytest.approx(
        1 + 3 * (1 - math.cos(math.pi / 50**5))
    )
    assert guidance(guider, timestep=19, step_idx=49) == pytest.approx(7.0)
    assert guidance(guider, timestep=19, step_idx=24) == pytest.approx(1 + 3 * (1 - math.cos(math.pi / 2**5)))
    # the sampler's step count overrides the constructor's
    assert guidance(guider, timestep=0, step_idx=9, num_steps=10) == pytest.approx(7.0)
    scales = [guidance(guider, timestep=0, step_idx=i) for i in range(50)]
    assert all(b >= a for a, b in zip(scales, scales[1:]))


def test_dynamic_cfg_exponent_validation():
    with pytest.raises(ValueError, match="exp must be an integer"):
        DynamicCFG(6.0, exp=2.5)
    DynamicCFG(6.0, exp=2.5, use_step_index=True)


def test_vanilla_cfg():
    x_u, x_c = torch.randn(2, 4), torch.randn(2, 4)
    x0_hat = torch.cat([x_u, x_c])
    torch.testing.assert_close(VanillaCFG(1.0)(x0_hat, timestep=999, step_idx=0), x_c)
    torch.testing.assert_close(VanillaCFG(0.0)(x0_hat, timestep=999, step_idx=0), x_u)
    torch.testing.assert_close(VanillaCFG(3.0)(x0_hat, timestep=999, step_idx=0), x_u + 3 * (x_c - x_u))


def test_cfg_prepare_inputs_orders_uc_then_c():
    x, a = torch.randn(2, 3), torch.tensor([0.5, 0.5])
    cond = {"crossattn": torch.ones(2, 5, 8), "vector": torch.ones(2, 4), "mode": "video"}
    uc = {"crossattn": torch.zeros(2, 5, 8), "vector": torch.zeros(2, 4), "mode": "video"}
    x_in, a_in, cond_in = VanillaCFG(5.0).prepare_inputs(x, a, cond, uc)
    torch.testing.assert_close(x_in, torch.cat([x, x]))
    torch.testing.assert_close(a_in, torch.cat([a, a]))
    assert cond_in["crossattn"][:, 0, 0].tolist() == [0, 0, 1, 1]
    assert cond_in["vector"][:, 0].tolist() == [0, 0, 1, 1]
    assert cond_in["mode"] == "video"
    with pytest.raises(ValueError, match="cond\\['mode'\\]"):
        VanillaCFG(5.0).prepare_inputs(x, a, cond, {**uc, "mode": "image"})


def test_identity_guider():
    x, a, cond = torch.randn(2, 3), torch.ones(2), {"crossattn": torch.ones(2, 1)}
    assert IdentityGuider().prepare_inputs(x, a, cond, None) == (x, a, cond)
    assert IdentityGuider()(x, timestep=0, step_idx=0) is x
