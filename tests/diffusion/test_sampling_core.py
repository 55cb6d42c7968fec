"""The sampling core: sampler functions over a given grid, guidance and multi-prompt as denoiser wrappers,
the guider's row layout, and the per-call context."""

from dataclasses import replace
from functools import partial

import pytest
import torch

from tests.conftest import TINY_NETWORK
from vdm.build import build_engine, compose
from vdm.diffusion import IdentityGuider, VanillaCFG, VideoDDIMSampler, VPSDEDPMPP2MSampler, ZeroSNRDDPM
from vdm.diffusion.samplers import (
    Grid,
    GuidedDenoiser,
    Step,
    sample_ddim,
    sample_dpmpp_2m_sde,
)
from vdm.networks.attention_control import CallContext, SharePair

DISC = ZeroSNRDDPM(shift_scale=3.0)


def test_grid_of_a_discretization_and_its_steps():
    grid = Grid.of(DISC, 10)
    assert len(grid) == 10 and grid.timesteps[0] == 999 and grid.alphas[0] == 0 and grid.alphas[-1] == 1
    steps = list(grid.steps())
    assert [s.idx for s in steps] == list(range(10)) and all(s.num_steps == 10 for s in steps)
    assert [s.timestep for s in steps] == grid.timesteps.tolist()
    assert [s.a for s in steps] == grid.alphas[:-1].tolist()
    with pytest.raises(ValueError, match="a grid of 10 timesteps needs 11 alphas"):
        Grid(grid.timesteps, grid.alphas[:-1])


def test_ddim_walks_any_grid_it_is_given_and_back():
    """A grid walked backwards (as inversion does) undoes the forward walk for a denoiser whose estimate does not
    depend on x: DDIM is exactly invertible then."""
    x0 = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    x_T = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    full = Grid.of(DISC, 8)
    grid = Grid(full.timesteps[:-1], full.alphas[:-1])  # 0 = a_0 .. a_7 < 1: stops one step short of the data
    back = Grid(grid.timesteps.flip(0), grid.alphas.flip(0))
    seen = []

    def fixed(x, step):
        seen.append(step.a)
        return x0.expand_as(x)

    x_back = sample_ddim(fixed, sample_ddim(fixed, x_T, grid), back)
    torch.testing.assert_close(x_back, x_T, rtol=0, atol=1e-10)
    assert seen == grid.alphas[:-1].tolist() + back.alphas[:-1].tolist()


@pytest.mark.parametrize("guider", [IdentityGuider(), VanillaCFG(4.0)], ids=["none", "cfg"])
def test_the_sampler_config_is_its_function_over_its_grid(guider):
    """`sampler(model_denoise, x, cond, uc)` equals the function driving a GuidedDenoiser, bit for bit."""
    w = torch.randn(2, 1, 1, 1, 1)

    def model_denoise(x, a, cond, step_idx, timesteps, **_):
        return torch.tanh(x * w.repeat(x.shape[0] // 2, 1, 1, 1, 1) + cond["crossattn"].view(-1, 1, 1, 1, 1)) * a.view(
            -1, 1, 1, 1, 1)

    cond, uc = {"crossattn": torch.tensor([1.0, 2.0])}, {"crossattn": torch.zeros(2)}
    x = torch.randn(2, 3, 2, 4, 4)
    sampler = VPSDEDPMPP2MSampler(DISC, guider, num_steps=7)
    by_config = sampler(model_denoise, x, cond, uc, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    by_function = sample_dpmpp_2m_sde(GuidedDenoiser(model_denoise, guider, cond, uc), x, Grid.of(DISC, 7),
                                      lambda like: torch.randn(like.shape, generator=g))
    assert torch.equal(by_config, by_function)


def test_guided_denoiser_passes_the_step_and_the_context():
    seen = []
    ctx = CallContext()

    def model_denoise(x, a, cond, step_idx, timesteps, **kwargs):
        seen.append((x.shape[0], a.tolist(), cond["crossattn"].tolist(), step_idx, timesteps.tolist(), kwargs))
        return x * 0 + cond["crossattn"].view(-1, 1, 1, 1, 1)

    guided = GuidedDenoiser(model_denoise, VanillaCFG(3.0), {"crossattn": torch.ones(1)},
                            {"crossattn": torch.zeros(1)}, {"ctx": ctx})
    D = guided(torch.randn(1, 1, 1, 2, 2), Step(4, 10, 0.5, 399))
    assert seen == [(2, [0.5, 0.5], [0.0, 1.0], 4, [399, 399], {"ctx": ctx})]  # rows [uc, c]
    torch.testing.assert_close(D, torch.full((1, 1, 1, 2, 2), 3.0))  # 0 + 3·(1 − 0)


def test_the_guider_owns_the_row_layout():
    cfg, plain = VanillaCFG(2.0), IdentityGuider()
    # an edit pair: CFG rows [uc_src, uc_tgt, c_src, c_tgt]; masks from the conditional rows
    assert cfg.share_pairs([(0, 1)], 2) == (SharePair(0, 1, 2, 3), SharePair(2, 3, 2, 3))
    assert plain.share_pairs([(0, 1)], 2) == (SharePair(0, 1, 0, 1),)
    # three segments expanded into two (source, target) pairs, per branch
    assert cfg.expand_rows([0, 1, 1, 2], 3) == [0, 1, 1, 2, 3, 4, 4, 5]
    assert cfg.share_pairs([(0, 1), (2, 3)], 4) == (SharePair(0, 1, 4, 5), SharePair(2, 3, 6, 7),
                                                    SharePair(4, 5, 4, 5), SharePair(6, 7, 6, 7))
    x, a = torch.randn(3, 1, 1, 1, 1), torch.rand(3)
    x_in, a_in, cond_in = cfg.prepare_inputs(x, a, {"c": torch.ones(3)}, {"c": torch.zeros(3)})
    assert torch.equal(x_in, torch.cat([x, x])) and cond_in["c"].tolist() == [0, 0, 0, 1, 1, 1]


@pytest.fixture(scope="module")
def engine():
    engine = build_engine(compose(TINY_NETWORK + ["sampler.verbose=false", "sampler.num_steps=4",
                                                  "network.sample_frames=5", "sampler_multi_prompt.overlap_size=2"])).eval()
    with torch.no_grad():
        for p in engine.network.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    return engine


def test_the_multi_prompt_denoiser_of_one_segment_is_the_guided_denoiser(engine):
    """One prompt on one tile: the long latent's blended estimate is the plain guided one, and any sampler (here
    DDIM) can drive it."""
    cond, uc = engine.conditioning({"txt": ["a red square moving right"]})
    T = engine.network.config.max_latent_frames
    x = torch.randn(1, T, 48, 8, 8, generator=torch.Generator().manual_seed(1))
    multi = replace(engine.sampler_multi_prompt, tile_size=T)
    model_denoise = partial(engine.denoiser, engine.model)
    long = multi.denoiser(model_denoise, x, [cond], [uc], num_layers=engine.network.config.num_layers)
    guided = GuidedDenoiser(model_denoise, multi.guider, cond, uc, {"ctx": CallContext()})
    grid = Grid.of(multi.discretization, 4)
    with torch.no_grad():
        torch.testing.assert_close(sample_ddim(long, x, grid), sample_ddim(guided, x, grid), rtol=0, atol=1e-5)


def test_a_group_of_one_and_a_plain_cache_change_nothing_and_gradients_through_shards_are_refused(engine):
    from vdm.distributed import Processes
    from vdm.networks.caches import StepCache

    x, t, c = torch.randn(1, 2, 48, 8, 8), torch.tensor([10]), torch.randn(1, 4, engine.network.config.text_embed_dim)
    with pytest.raises(ValueError, match=r"sequence parallelism \(ulysses\) is for sampling"):
        engine.network(x, t, c, ctx=CallContext(group=Processes(0, 2)))  # (refused before any collective)
    with torch.no_grad():
        assert torch.equal(engine.network(x, t, c, ctx=CallContext(group=Processes())), engine.network(x, t, c))
    cache = StepCache(engine.network.config.num_layers)  # runs every block, asks nothing of the attention
    with torch.no_grad():
        assert torch.equal(engine.network(x, t, c, ctx=CallContext(cache=cache)), engine.network(x, t, c))
    assert cache.evaluations == engine.network.config.num_layers and cache.steps == [True]


def test_the_engine_keeps_no_control(engine):
    before = dict(vars(engine))
    control = engine.switch_adaln_layer("kv_sharing", start_step=1, end_step=3)
    assert control.name == "kv_sharing" and dict(vars(engine)).keys() == before.keys()
    assert not hasattr(engine, "control")
    cond, uc = engine.conditioning({"txt": ["a", "b"]})
    randn = torch.randn(1, 5, 48, 8, 8, generator=torch.Generator().manual_seed(2))
    sampler = VideoDDIMSampler(engine.sampler_single.discretization, engine.sampler_single.guider, num_steps=4)
    edited = engine.sample_pair(cond, uc, randn, sampler=sampler, control=control)
    plain = engine.sample_pair(cond, uc, randn, sampler=sampler)
    assert torch.equal(plain[0], edited[0])  # the source row never reads the target
    assert not torch.allclose(plain[1], edited[1])  # the control changed the target: it travelled with the call
