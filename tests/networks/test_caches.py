"""Step caches (vdm.networks.caches) through `sample.py cache=...`: diffusers' FirstBlockCache hook on the same
folder gives the same latents and skips the same steps; TeaCache skips as its rule says; a threshold of 0 gives
the uncached latents bit for bit; combinations that cannot work are one-line refusals."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.cogvideox_folder import make_cogvideox_folder
from tests.sampling.test_family_cli import PROMPT, SCALE, SEED, compare
from vdm.build import compose
from vdm.networks.caches import TEACACHE_COEFFICIENTS
from vdm.sampling import sample

STEPS = 20
DDIM = ["sampler=ddim", "guider=cfg", f"cfg={SCALE}", f"steps={STEPS}", f"seed={SEED}", "rescale=full",
        "save_latents=true", "sampler.verbose=false", f"prompts=[{PROMPT}]"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    return {v: make_cogvideox_folder(root / v, v) for v in ("2b", "5b")}


def run(folder, out, *overrides) -> tuple[torch.Tensor, dict]:
    sample(compose([f"pretrained={folder}", *DDIM, f"output_dir={out}", *overrides], config_name="sample"))
    row = json.loads((out / "samples.jsonl").read_text())
    return load_file(out / row["latent"])["latent"], row


def diffusers_with_cache(folder, threshold: float | None = None, pab: tuple | None = None):
    """CogVideoXPipeline's latents and frames with `enable_cache(FirstBlockCacheConfig(threshold))` or, with `pab`
    (block_skip_range, (lo, hi)), `PyramidAttentionBroadcastConfig`'s spatial broadcast (neither: no cache), and how
    often block 1's attention ran (the steps that ran blocks 1..; PAB: that layer's attention computations)."""
    from diffusers import CogVideoXPipeline
    from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    pipe = CogVideoXPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if threshold is not None:
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    if pab is not None:
        pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=pab[0], spatial_attention_timestep_skip_range=pab[1],
            current_timestep_callback=lambda: pipe.current_timestep))
    calls = []  # to_q runs only when the attention is computed (PAB's hook returns its cache without calling it)
    pipe.transformer.transformer_blocks[1].attn1.to_q.register_forward_pre_hook(lambda *_: calls.append(1))
    c = pipe.transformer.config
    cond, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=c.max_text_seq_length)
    kwargs = dict(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond), num_frames=c.sample_frames,
                  num_inference_steps=STEPS, guidance_scale=SCALE, use_dynamic_cfg=False)
    with torch.no_grad():
        latents = pipe(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="latent").frames
        computed = len(calls)
        frames = pipe(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="np").frames[0]
    return latents, frames, computed


@pytest.mark.parametrize("variant, threshold", [("2b", 1.5), ("5b", 2.0)])
def test_first_block_cache_matches_diffusers_hook(folders, tmp_path, variant, threshold):
    latents, frames, computed = diffusers_with_cache(folders[variant], threshold)
    _, row = run(folders[variant], tmp_path / "fbc", "cache=first_block", f"cache.threshold={threshold}")
    cache = row["cache"]
    assert cache["computed_steps"] == computed and 1 < computed < STEPS, (cache, computed)  # some steps skipped
    assert cache["block_evaluations"] == STEPS + (computed * (2 - 1))  # 2-layer tiny DiT: block 0 always
    compare(tmp_path / "fbc", latents, frames, f"first_block {variant} threshold {threshold} ({computed} of {STEPS} "
            "steps computed)")


@pytest.mark.parametrize("variant, skip, timesteps", [("2b", 2, (100, 800)), ("5b", 3, (0, 1000))])
def test_pyramid_attention_broadcast_matches_diffusers_hook(folders, tmp_path, variant, skip, timesteps):
    latents, frames, computed = diffusers_with_cache(folders[variant], pab=(skip, timesteps))
    _, row = run(folders[variant], tmp_path / "pab", "cache=pab", f"cache.block_skip_range={skip}",
                 f"cache.timestep_skip_range=[{timesteps[0]},{timesteps[1]}]")
    per_layer = row["cache"]["attention_evaluations"] / 2  # the tiny DiT's 2 layers broadcast alike
    assert per_layer == computed and computed < STEPS, (row["cache"], computed)
    compare(tmp_path / "pab", latents, frames, f"pab {variant} skip {skip} range {timesteps} ({computed} of {STEPS} "
            "attention evaluations a layer)")


def test_a_zero_threshold_gives_the_uncached_latents_bit_for_bit(folders, tmp_path):
    plain, _ = run(folders["5b"], tmp_path / "plain")
    for name, option in (("first_block", "threshold=0"), ("teacache", "threshold=0"), ("pab", "block_skip_range=1")):
        cached, row = run(folders["5b"], tmp_path / name, f"cache={name}", f"cache.{option}")
        assert torch.equal(cached, plain), name
        assert row["cache"]["computed_steps"] == STEPS and row["cache"].get("attention_evaluations", 2 * STEPS) \
            == 2 * STEPS


def test_teacache_skips_the_steps_its_rule_names(folders, tmp_path):
    """The rule on the time embeddings of the sampler's timesteps (it depends on nothing else), written out here:
    accumulate the rescaled relative L1 change; skip while the sum stays below the threshold."""
    from vdm.networks.embeddings import timestep_embedding
    from vdm.sampling.load import load_pretrained, make_sampler

    threshold = 0.05
    _, row = run(folders["5b"], tmp_path / "tea", "cache=teacache", f"cache.threshold={threshold}")
    loaded = load_pretrained(folders["5b"])
    network = loaded.engine.network
    job = compose(["sampler=ddim", "guider=cfg"], config_name="sample")
    sampler = make_sampler(loaded.config, job.sampler, STEPS, SCALE, job.guider, "full")

    c = network.config
    with torch.no_grad():
        embs = [network.time_embedding(timestep_embedding(torch.tensor([float(t)]), c.hidden_size, c.flip_sin_to_cos,
                                                          c.freq_shift)) for t in sampler.grid().timesteps.tolist()]
    poly, acc, expected = np.poly1d(TEACACHE_COEFFICIENTS["cogvideox_5b"]), 0.0, []
    for i, emb in enumerate(embs):
        if i in (0, STEPS - 1):
            acc, compute = 0.0, True
        else:
            acc += poly(((emb - embs[i - 1]).abs().mean() / embs[i - 1].abs().mean()).item())
            compute = acc >= threshold
            acc = 0.0 if compute else acc
        expected.append(compute)
    assert row["cache"]["computed_steps"] == sum(expected) and sum(expected) < STEPS, (row["cache"], expected)
    assert row["cache"]["block_evaluations"] == 2 * sum(expected)


@pytest.mark.parametrize("overrides, message", [
    (["cache=first_block", "cache.threshold=-0.1"], r"cache.threshold=-0.1: the first_block cache's threshold must be"),
    (["cache=pab", "cache.block_skip_range=0"], r"cache.block_skip_range=0 must be an integer >= 1"),
    (["cache=first_block", "+cache.coefficients=[1,0]"], r"cache.coefficients \(an option of cache=teacache\) is not an "
                                                          r"option of cache=first_block"),
    (["cache=teacache", "prompts=[a,b,c]", "overlap_size=0", "tile_size=2"],
     r"cache=teacache on a multi-prompt video under control kv_sharing needs reuse=false"),
    (["cache=first_block", "control=[visualize]", "attn_map_layer_idx=[0]", "attn_map_step_idx=[1]"],
     r"cannot skip the steps a control must see \(visualize: it reads"),
])
def test_combinations_that_cannot_work_are_refused_before_writing(folders, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        sample(compose([f"pretrained={folders['2b']}", "prompts=[x]", "steps=2", f"output_dir={tmp_path / 'out'}",
                        *overrides], config_name="sample"))
    assert not (tmp_path / "out").exists()


def test_teacache_without_coefficients_for_another_model_is_refused(tmp_path):
    from tests.test_sample import trained_run

    run_dir = trained_run(tmp_path)
    with pytest.raises(ValueError, match=r"cache=teacache: no published coefficients for this model .* give "
                                         r"cache.coefficients"):
        sample(compose([f"checkpoint={run_dir}", "prompts=[x]", "steps=2", f"output_dir={tmp_path / 'out'}",
                        "cache=teacache"], config_name="sample"))
    assert not (tmp_path / "out").exists()


def test_a_cache_on_cogvideox_15_image_to_video_matches_diffusers_hook(tmp_path):
    """CogVideoXImageToVideoPipeline on a 1.5-I2V-like folder with the first-block cache: the same latents."""
    from diffusers import CogVideoXImageToVideoPipeline
    from diffusers.hooks import FirstBlockCacheConfig
    from PIL import Image

    from tests.sampling.test_family_cli import pipeline_outputs, write_image

    folder = make_cogvideox_folder(tmp_path / "15_i2v", "15_i2v")
    image = write_image(tmp_path / "a.png", (32, 24))
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(folder)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1.0))
    calls = []
    pipe.transformer.transformer_blocks[1].attn1.to_q.register_forward_pre_hook(lambda *_: calls.append(1))
    latents, frames = pipeline_outputs(pipe, False, image=Image.open(image).convert("RGB"))
    computed = len(calls) // 2  # pipeline_outputs samples twice (latents, then frames)
    out = tmp_path / "out"
    sample(compose([f"pretrained={folder}", f"image={image}", *DDIM, f"output_dir={out}", "cache=first_block",
                    "cache.threshold=1.0", "steps=10"], config_name="sample"))
    row = json.loads((out / "samples.jsonl").read_text())
    assert row["cache"]["computed_steps"] == computed and computed < 10, (row["cache"], computed)
    compare(out, latents, frames, f"first_block 1.5-I2V ({computed} of 10 steps computed)")


def test_teacache_coefficients_are_fitted_from_uncached_sampling_and_used(folders, tmp_path, capsys):
    """`python -m vdm.sampling.teacache_fit`: one pair per call after the first, a degree-4 least-squares fit that
    recovers a polynomial exactly from its own values, and the printed options sample with those coefficients."""
    from vdm.sampling import teacache_fit

    coefficients = teacache_fit.main([f"pretrained={folders['5b']}", "prompts=[a red square,a blue circle]",
                                      "steps=6", "sampler=ddim", "sampler.verbose=false"])
    report, line = capsys.readouterr().out.strip().splitlines()[-2:]
    assert report.startswith("10 steps recorded over 2 prompts")  # 2 x (6 calls - the first)
    assert len(coefficients) == 5 and line.startswith("cache=teacache cache.coefficients=[")
    known = np.poly1d([3.0, -2.0, 0.5, 0.1, 0.01])
    x = np.linspace(0.01, 0.5, 9)
    np.testing.assert_allclose(teacache_fit.fit(list(zip(x, known(x)))), known.coeffs, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="3 recorded steps cannot fit a polynomial of degree 4"):
        teacache_fit.fit([(0.1, 0.2)] * 3)
    _, row = run(folders["5b"], tmp_path / "fitted", *line.split(), "cache.threshold=0.3")
    assert row["cache"]["coefficients"] == pytest.approx(coefficients, rel=1e-6)


def test_an_edit_pair_takes_a_cache_its_rows_share(folders, tmp_path):
    """mode=edit with KV-sharing under each cache: at threshold 0 (PAB: skip range 1) the pair's latents are the
    uncached pair's bit for bit; above it steps are skipped for both rows at once and recorded in both."""
    edit = ["mode=edit", "prompts=[a red square moving right,a blue circle moving up]",
            "control_options={start_step:1,end_step:8}"]

    def pair(out, *overrides):
        sample(compose([f"pretrained={folders['5b']}", *DDIM, f"output_dir={out}", *edit, *overrides],
                       config_name="sample"))
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        return torch.stack([load_file(out / r["latent"])["latent"] for r in rows]), rows

    plain, _ = pair(tmp_path / "plain")
    for name, exact in (("first_block", "threshold=0"), ("teacache", "threshold=0"), ("pab", "block_skip_range=1")):
        cached, _ = pair(tmp_path / name, f"cache={name}", f"cache.{exact}")
        assert torch.equal(cached, plain), name
    _, rows = pair(tmp_path / "skipping", "cache=first_block", "cache.threshold=2.0")
    assert rows[0]["cache"] == rows[1]["cache"] and rows[0]["cache"]["computed_steps"] < STEPS


def test_a_multi_prompt_video_takes_a_cache_per_segment_pass(folders, tmp_path):
    """sample.py on a 3-prompt DiTCtrl video with reuse=false: threshold 0 gives the uncached latent bit for bit, and
    samples.jsonl sums what every pair pass's cache computed."""
    line = ["prompts=[a red square,a blue circle,a green square]", "overlap_size=1", "tile_size=3", "reuse=false",
            "steps=4", "control_options={start_step:1,end_step:3}"]
    plain, _ = run(folders["2b"], tmp_path / "plain", *line)
    cached, row = run(folders["2b"], tmp_path / "cached", *line, "cache=first_block", "cache.threshold=0")
    assert torch.equal(plain, cached)
    passes = row["cache"]["passes"]  # one per adjacent pair of segments
    assert passes == row["layout"]["segments"] - 1 and row["cache"]["steps"] == 4 * passes
    assert row["cache"]["computed_steps"] == 4 * passes and row["cache"]["block_evaluations"] == 2 * 4 * passes
