import numpy as np
import pytest
import torch

from vdm.diffusion import LegacyDDPM, ZeroSNRDDPM


def reference_schedule(n, shift=3.0, T=1000, start=0.00085, end=0.012):
    """SPEC §3 in plain numpy float64: timesteps and subset-rescaled a."""
    betas = np.linspace(np.sqrt(start), np.sqrt(end), T, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    ac = ac / (shift + (1 - shift) * ac)
    t = np.linspace(T - 1, 0, n, endpoint=False).astype(int)[::-1]
    a = np.sqrt(ac[t])
    a = (a - a[-1]) * a[0] / (a[0] - a[-1])
    return t, a


def test_schedule_matches_spec_formulas():
    t_ref, a_ref = reference_schedule(50)
    t, a = ZeroSNRDDPM(shift_scale=3.0).schedule(50)
    assert t.dtype == torch.int64 and a.dtype == torch.float64
    assert t.tolist() == list(range(19, 1000, 20)) == t_ref.tolist()
    np.testing.assert_allclose(a.numpy(), a_ref, rtol=0, atol=1e-12)
    assert a[-1].item() == 0.0  # zero terminal SNR at t = 999


def test_first_value_is_unrescaled():
    # the smallest timestep keeps its shifted, un-rescaled value
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ac19 = np.prod(1 - betas[:20])
    _, a = ZeroSNRDDPM(shift_scale=3.0).schedule(50)
    assert a[0].item() == pytest.approx(np.sqrt(ac19 / (3 - 2 * ac19)), abs=1e-12)


def test_table_is_full_rescale_and_monotone():
    d = ZeroSNRDDPM(shift_scale=3.0)
    table = d.table()
    assert table.shape == (1000,) and table.dtype == torch.float64
    assert (table[1:] < table[:-1]).all()
    assert table[-1].item() == 0.0
    t_all, a_all = d.schedule(1000)  # n = T: every timestep, subset == full
    assert t_all.tolist() == list(range(1000))
    torch.testing.assert_close(a_all, table, rtol=0, atol=1e-15)


def test_subset_vs_full_rescale_values():
    _, a_subset = ZeroSNRDDPM(shift_scale=3.0, rescale="subset").schedule(50)
    t_full, a_full = ZeroSNRDDPM(shift_scale=3.0, rescale="full").schedule(50)
    assert round(a_full[0].item(), 5) == 0.97292
    assert round(a_subset[0].item(), 5) == 0.97394
    torch.testing.assert_close(a_full, ZeroSNRDDPM(shift_scale=3.0).table()[t_full])


def test_one_step_grid_is_pure_noise():
    t, a = ZeroSNRDDPM(shift_scale=3.0).schedule(1)
    assert t.tolist() == [999] and a.tolist() == [0.0]


def test_legacy_ddpm_has_no_shift_and_positive_terminal():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ref = np.sqrt(np.cumprod(1 - betas))
    d = LegacyDDPM()
    np.testing.assert_allclose(d.table().numpy(), ref, rtol=1e-12)
    t, a = d.schedule(50)
    assert 0 < a[-1].item() < 0.1
    np.testing.assert_allclose(a.numpy(), ref[t.numpy()], rtol=1e-12)


@pytest.mark.parametrize("n", [0, 1001, -3, 2.5])
def test_bad_num_steps(n):
    with pytest.raises(ValueError, match="num_steps"):
        ZeroSNRDDPM().schedule(n)


def test_bad_rescale():
    with pytest.raises(ValueError, match="rescale must be one of \\('subset', 'full'\\)"):
        ZeroSNRDDPM(rescale="trailing")
