"""Multi-prompt layout, blending, and the reuse schedule's exactness against the reference schedule."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from vdm.build import build_engine
from vdm.diffusion.multi_prompt import (
    blend_weights,
    long_latent_frames,
    mix_conditions,
    num_segments,
    plan_segments,
)
from vdm.networks.attention_control import AttentionControl


@pytest.mark.parametrize("K, m, q", [(1, 0, 0), (2, 0, 0), (2, 3, 0), (3, 2, 0), (3, 2, 1), (4, 1, 2), (2, 0, 5)])
def test_segment_count_formula(K, m, q):
    plan = plan_segments(K, m, q) if K > 1 or (m == 0 and q == 0) else None
    assert len(plan) == num_segments(K, m, q) == K + m * (K - 1) + (q * (K - 2) if K > 2 else 0)


def test_plan_order_and_transition_mixes():
    plan = plan_segments(3, num_transition_blocks=2, longer_mid_segment=1)
    assert [(s.a, s.b, round(s.mix, 6)) for s in plan] == [
        (0, 0, 0.0), (0, 1, 0.333333), (0, 1, 0.666667), (1, 1, 0.0), (1, 1, 0.0), (1, 2, 0.333333),
        (1, 2, 0.666667), (2, 2, 0.0)]
    assert [s.uc_prompt for s in plan] == [0, 0, 1, 1, 1, 1, 2, 2]  # uncond of the closer prompt
    conds = [{"crossattn": torch.full((1, 2, 3), float(i))} for i in range(3)]
    mixed = mix_conditions(conds, plan)
    torch.testing.assert_close(mixed[1]["crossattn"], torch.full((1, 2, 3), 1 / 3))
    torch.testing.assert_close(mixed[6]["crossattn"], torch.full((1, 2, 3), 1 + 2 / 3))


def test_long_latent_length_and_bad_tiles():
    assert long_latent_frames(7, 13, 9) == 13 + 6 * 4 == 37
    assert long_latent_frames(1, 13, 6) == 13
    with pytest.raises(ValueError, match="overlap_size=13 must be in 0..12 \\(below tile_size=13\\)"):
        long_latent_frames(3, 13, 13)
    with pytest.raises(ValueError, match="need at least two prompts"):
        plan_segments(1, num_transition_blocks=2)


@pytest.mark.parametrize("L", [4, 9, 13])
def test_blend_weights_are_triangular_and_symmetric(L):
    w = blend_weights(L)
    expected = torch.tensor([min((j + 0.5) * 2 / L, 2 - (j + 0.5) * 2 / L) for j in range(L)], dtype=torch.float64)
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w, w.flip(0))
    assert (w > 0).all() and w.max() <= 1


class ShareKV(AttentionControl):
    """A minimal KV-sharing control for these tests: targets use their source's K/V in a window."""

    def __init__(self, steps, layers):
        self.steps, self.layers = set(steps), set(layers)

    def active(self, step_idx, layer_idx, num_layers=None):
        return step_idx in self.steps and layer_idx in self.layers

    def __call__(self, q, k, v, call):
        if not call.pairs or not self.active(call.step_idx, call.layer_idx):
            return F.scaled_dot_product_attention(q, k, v)
        source = torch.arange(q.shape[0])
        for pair in call.pairs:
            source[pair.target] = pair.source
        return F.scaled_dot_product_attention(q, k[source], v[source])


def multi_prompt_engine(tiny_cfg, *overrides):
    engine = build_engine(tiny_cfg("network.num_layers=4", "sampler.num_steps=6", "sampler_multi_prompt.overlap_size=3",
                                   "sampler_multi_prompt.num_transition_blocks=2", "network.sample_frames=5",
                                   *overrides)).eval()
    with torch.no_grad():  # move off the zero init, where attention has no effect on the output
        for p in engine.network.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return engine


def run(engine, prompts, stats=None, **kw):
    batch = [{"txt": [p]} for p in prompts]
    conds, ucs = zip(*(engine.conditioning(b) for b in batch))
    sampler = engine.sampler_multi_prompt
    tile = sampler.tile_size or engine.network.config.max_latent_frames
    frames = long_latent_frames(len(plan_segments(len(prompts), sampler.num_transition_blocks)), tile,
                                sampler.overlap_size)
    randn = torch.randn(1, frames, 48, 8, 8, generator=torch.Generator().manual_seed(0))
    return engine.sample_multi_prompt(list(conds), list(ucs), randn, generator=torch.Generator().manual_seed(1),
                                      stats=stats, **kw)


PROMPTS = ["a red square moving right", "a red square moving down", "a blue circle moving left"]


@pytest.mark.parametrize("overrides", [[], ["guider=none"]], ids=["cfg", "no_cfg"])
def test_reuse_schedule_equals_the_reference_schedule(tiny_cfg, overrides):
    engine = multi_prompt_engine(tiny_cfg, *overrides)
    control = ShareKV(steps=[1, 2, 3], layers=[2, 3])
    stats_ref, stats_reuse = {}, {}
    reference = run(engine, PROMPTS, stats_ref, sampler=replace(engine.sampler_multi_prompt, reuse=False),
                    control=control)
    reused = run(engine, PROMPTS, stats_reuse, sampler=replace(engine.sampler_multi_prompt, reuse=True),
                 control=control)
    assert reference.shape == (1, 5 + 6 * 2, 48, 8, 8)  # S = 3 + 2*2 = 7 segments of 5 frames, overlap 3
    torch.testing.assert_close(reused, reference, rtol=0, atol=1e-5)

    S, layers, steps = 7, 4, 6
    assert stats_ref["layer_evaluations"] == 2 * (S - 1) * layers * steps
    # 3 window steps: S rows below layer 2, 2(S-1) above; 3 other steps: S rows everywhere
    assert stats_reuse["layer_evaluations"] == 3 * (S * 2 + 2 * (S - 1) * 2) + 3 * S * layers

    plain = run(engine, PROMPTS, control=AttentionControl())
    assert not torch.allclose(plain, reference, atol=1e-3)  # the control does change the video


@pytest.mark.parametrize("name, options", [
    ("kv_sharing", {}),
    ("kv_sharing_mask_guided", {"ref_token_idx": [2], "cur_token_idx": [2], "thres": 0.3}),
    ("reweight", {"reweight_token_idx": 2, "reweight_scale": 2.0}),
], ids=["kv_sharing", "mask_guided", "reweight"])
def test_reuse_equals_reference_for_every_control(tiny_cfg, name, options):
    engine = multi_prompt_engine(tiny_cfg)
    control = engine.switch_adaln_layer(name, start_step=1, end_step=4, **options)  # layers: the depth-scaled default
    latents = {}
    for reuse in (False, True):
        latents[reuse] = run(engine, PROMPTS[:2], sampler=replace(engine.sampler_multi_prompt, reuse=reuse),
                             control=control)
    torch.testing.assert_close(latents[True], latents[False], rtol=0, atol=1e-5)
    assert not torch.allclose(run(engine, PROMPTS[:2], control=engine.switch_adaln_layer("base")), latents[True],
                              atol=1e-4)


def test_window_beyond_the_sampler_steps_is_refused(tiny_cfg):
    engine = multi_prompt_engine(tiny_cfg)
    control = engine.switch_adaln_layer("kv_sharing")  # the reference window: steps 2..25, but the sampler takes 6
    with pytest.raises(ValueError, match="end_step=25"):
        run(engine, PROMPTS[:2], control=control)


def test_sampling_twice_gives_identical_latents(tiny_cfg):
    engine = multi_prompt_engine(tiny_cfg)
    control = ShareKV(steps=[1, 2], layers=[3])
    assert torch.equal(run(engine, PROMPTS[:2], control=control), run(engine, PROMPTS[:2], control=control))


def test_tile_larger_than_the_network_is_refused(tiny_cfg):
    engine = multi_prompt_engine(tiny_cfg)
    with pytest.raises(ValueError, match="tile_size=7 exceeds the network's 5 latent frames"):
        run(engine, PROMPTS, tile_size=7)
