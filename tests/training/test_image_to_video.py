"""Training image-to-video and CogVideoX 1.5 models: the clip's noised first frame as the image latent (SAT's
noise and dropout), 1.5's padding to whole tokens, precomputed first-frame latents, and a model that learns to
use the image."""

import math

import pytest
import torch
from einops import rearrange

from tests.conftest import TINY_NETWORK
from vdm.build import build_engine, compose, instantiate
from vdm.conditioning.image import FIRST_FRAME_KEY, FIRST_FRAME_LOG_SIGMA, noise_first_frame
from vdm.errors import BadInput
from vdm.training import loop


def engine_of(*overrides: str):
    return build_engine(compose(TINY_NETWORK + ["sampler.verbose=false", *overrides], config_name="train"))


def world_batch(cfg_overrides=(), n: int = 4, start: int = 0) -> dict:
    data = instantiate(compose(["sampler.verbose=false", *cfg_overrides], config_name="train").data)
    items = [data[start + i] for i in range(n)]
    return {"mp4": torch.stack([it["mp4"] for it in items]), "txt": [it["txt"] for it in items]}


def test_first_frame_noise_is_sats_log_normal_sigma():
    frames = torch.zeros(4000, 3, 8, 8)
    noised = noise_first_frame(frames, torch.Generator().manual_seed(0))
    log_sigma = noised.flatten(1).std(dim=1).log()  # each sample's sigma, from 192 draws
    mean, std = FIRST_FRAME_LOG_SIGMA
    assert abs(log_sigma.mean().item() - mean) < 0.03 and abs(log_sigma.std().item() - std) < 0.03
    few = noise_first_frame(frames[:3], torch.Generator().manual_seed(1))
    brighter = noise_first_frame(frames[:3] + 0.99, torch.Generator().manual_seed(1))
    torch.testing.assert_close(brighter - 0.99, few)  # added to the frame, not clamped or scaled
    assert brighter.max() > 1


def test_training_batch_holds_the_noised_first_frame_latent_then_zeros():
    engine = engine_of("image_to_video=true")
    batch = world_batch()
    torch.manual_seed(5)
    z, prepared = engine.prepare_batch(batch)
    torch.manual_seed(5)
    engine.encode_video(batch["mp4"])  # the same draws, in order: the clip's posterior (none here), then the frame
    expected = engine.encode_image(noise_first_frame(batch["mp4"][:, 0]))
    image = prepared["image_latents"]
    assert image.shape == z.shape
    torch.testing.assert_close(image[:, :1], expected)
    assert not torch.equal(image[:, :1], engine.encode_image(batch["mp4"][:, 0]))  # noised
    assert image[:, 1:].abs().max() == 0
    cond = engine.conditioner.train()(prepared)
    torch.testing.assert_close(cond["concat"], image)  # image_dropout 0: always there


def test_image_dropout_zeroes_training_latents_but_never_sampling_ones():
    engine = engine_of("image_to_video=true", "image_dropout=0.5")
    z, prepared = engine.prepare_batch(world_batch(n=64))
    kept = engine.conditioner.train()(prepared, generator=torch.Generator().manual_seed(0))["concat"]
    dropped = kept.flatten(1).abs().amax(dim=1) == 0
    assert 20 <= int(dropped.sum()) <= 44  # per sample, p = 0.5
    torch.testing.assert_close(kept[~dropped], prepared["image_latents"][~dropped])
    cond, uc = engine.eval().conditioning(prepared)
    torch.testing.assert_close(cond["concat"], prepared["image_latents"])
    torch.testing.assert_close(uc["concat"], prepared["image_latents"])  # both guidance branches see the image
    with pytest.raises(BadInput, match=r"image_dropout=1.5 must be in \[0, 1\]"):
        engine_of("image_to_video=true", "image_dropout=1.5")


def test_cogvideox_15_training_pads_odd_latents_with_a_copy_of_the_first():
    from vdm.networks.dit import DiTConfig

    engine = engine_of()
    engine.network.config = DiTConfig(patch_size_t=2)  # only the frame rule is read
    z = torch.randn(2, 3, 4, 5, 5)
    padded = engine.padded(z)
    assert padded.shape[1] == 4 and torch.equal(padded[:, 0], z[:, 0]) and torch.equal(padded[:, 1:], z)
    assert torch.equal(engine.decodable(padded), z)  # what is decoded is the clip
    assert engine.padded(padded) is padded  # an even count is whole tokens already


def test_precomputed_first_frame_latents_train_as_the_pixels_do(tmp_path):
    from safetensors import safe_open

    from vdm.data.latents import PrecomputedLatents
    from vdm.precompute import precompute

    base = ["image_to_video=true", "data.length=3"]
    out = tmp_path / "latents"
    precompute(compose(base, config_name="train"), out, shard_size=2)
    with safe_open(str(out / "shard-00000.safetensors"), framework="pt") as f:
        assert f.get_slice(FIRST_FRAME_KEY).get_shape() == [2, 48, 1, 8, 8]
    data = PrecomputedLatents(out)
    item = data[2]
    engine = engine_of("image_to_video=true", "latent_input=true")
    batch = {"mp4": item["mp4"][None], "txt": [item["txt"]], "crossattn": item["crossattn"][None],
             FIRST_FRAME_KEY: item[FIRST_FRAME_KEY][None]}
    z, prepared = engine.prepare_batch(batch)
    expected = rearrange(item[FIRST_FRAME_KEY][None], "b c t h w -> b t c h w") * engine.scale_factor
    torch.testing.assert_close(prepared["image_latents"][:, :1], expected)
    # the stored latent is the first frame's, noised: close to the clean frame's encoding, not equal to it
    pixels = world_batch(["data.length=3"], n=3)["mp4"][2:, 0]
    clean = engine_of("image_to_video=true").encode_image(pixels)
    assert 0 < (expected - clean).abs().max() < 0.5
    without = {k: v for k, v in batch.items() if k != FIRST_FRAME_KEY}
    with pytest.raises(BadInput, match="precompute them again"):
        engine.prepare_batch(without)


def test_an_image_to_video_model_learns_to_use_the_image(tmp_path, monkeypatch):
    """Trained on the synthetic world with its clips' first frames, the model's loss on unseen clips is lower with
    each clip's own image than with another clip's or none."""
    built = []
    real_build = loop.build_engine
    monkeypatch.setattr(loop, "build_engine", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    cfg = compose(TINY_NETWORK + [f"runs_root={tmp_path}", "run_name=i2v", "batch_size=8", "max_steps=300",
                                  "log_every=50", "video_every=0", "checkpoint.every=null", "scheduler.warmup_steps=5",
                                  "sampler.verbose=false", "image_to_video=true", "image_dropout=0.05",
                                  "ema.enabled=false"], config_name="train")
    loop.train(cfg, tmp_path / "i2v")
    engine = built[0].eval()
    batch = world_batch(n=16, start=100_000)  # clips the run never drew
    torch.manual_seed(3)
    z, prepared = engine.prepare_batch(batch)
    g = torch.Generator().manual_seed(1)
    idx, noise = torch.randint(700, 1000, (16,), generator=g), torch.randn(z.shape, generator=g)

    def loss(image: torch.Tensor) -> float:
        with torch.no_grad():
            return engine.loss_fn(engine.model, engine.denoiser, engine.conditioner, z,
                                  {**prepared, "image_latents": image}, noise=noise, idx=idx).mean().item()

    own = loss(prepared["image_latents"])
    others, none = loss(prepared["image_latents"].roll(1, 0)), loss(torch.zeros_like(prepared["image_latents"]))
    assert math.isfinite(own) and own < 0.95 * others and own < 0.97 * none, (own, others, none)
