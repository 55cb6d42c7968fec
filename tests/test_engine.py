"""VideoDiffusionEngine: parameters, first-stage layout and chunking, training step, sampling."""

import pytest
import torch
import torch.nn as nn

from vdm.build import build_engine
from vdm.engine import VideoDiffusionEngine
from vdm.networks.lora import add_lora


def world_batch(B=2, T=9, H=32, W=32):
    return {"mp4": torch.rand(B, T, 3, H, W) * 2 - 1, "txt": ["a red square moving left", "a blue circle"][:B]}


class RecordingLoss:
    """Stands in for the loss: records the x0 the engine hands it and the batch."""

    def __init__(self):
        self.x0 = None
        self.batch = None

    def __call__(self, network, denoiser, conditioner, x0, batch):
        self.x0, self.batch = x0, batch
        return x0.flatten(1).mean(1)


class LayoutProbeStage(nn.Module):
    """A first stage that insists on `B C T H W` with C=3 and keeps values, so layouts can be traced."""

    latent_channels = 3
    spatial_compression = 1
    temporal_compression = 1

    def __init__(self, frames: int):
        super().__init__()
        self.frames = frames
        self.calls = 0

    def encode(self, x):
        assert x.shape[1] == 3 and x.shape[2] == self.frames, f"expected B C T H W, got {tuple(x.shape)}"
        self.calls += 1
        return x.clone()

    def decode(self, z):
        return z.clone()


def probe_engine(tiny_cfg, frames=5, **options):
    engine = build_engine(tiny_cfg("first_stage=pixel_shuffle", "first_stage.model.factor=1", "network.sample_height=8",
                                   "network.sample_width=8", "network.patch_size=1"))
    loss = RecordingLoss()
    stage = LayoutProbeStage(frames)
    engine = VideoDiffusionEngine(engine.network, engine.denoiser, engine.conditioner, stage, loss,
                                  engine.sampler_single, scale_factor=0.5, **options)
    return engine, loss, stage


def t_and_c_coded_video(B=1, T=5, H=8, W=8):
    """Frame t, channel c holds the value 10*t + c everywhere."""
    t = torch.arange(T).view(1, T, 1, 1, 1)
    c = torch.arange(3).view(1, 1, 3, 1, 1)
    return (10.0 * t + c).expand(B, T, 3, H, W).clone()


def test_shared_step_hands_the_loss_b_t_c_h_w_latents(tiny_cfg):
    engine, loss, stage = probe_engine(tiny_cfg)
    video = t_and_c_coded_video()
    engine.shared_step({"mp4": video, "txt": ["x"]})
    assert stage.calls == 1
    assert loss.x0.shape == video.shape
    torch.testing.assert_close(loss.x0, video * 0.5)  # same (t, c) layout, scaled by scale_factor


def test_latent_input_skips_the_first_stage(tiny_cfg):
    engine, loss, stage = probe_engine(tiny_cfg, latent_input=True)
    video = t_and_c_coded_video()
    stored = video.permute(0, 2, 1, 3, 4)  # latents are stored in the VAE's B C T H W layout
    engine.shared_step({"mp4": stored, "txt": ["x"]})
    assert stage.calls == 0
    torch.testing.assert_close(loss.x0, video * 0.5)


def test_lr_scale_concatenates_low_resolution_latents(tiny_cfg):
    engine = build_engine(tiny_cfg("lr_scale=4"))
    assert engine.network.config.in_channels == 2 * 48
    seen = {}
    real_loss = engine.loss_fn

    def capture(network, denoiser, conditioner, x0, batch):
        seen.update(conditioner(batch))  # the conditioner's LowResolutionVideo embedder gives `concat`
        return real_loss(network, denoiser, conditioner, x0, batch)

    engine.loss_fn = capture
    batch = world_batch()
    loss, _ = engine.shared_step(batch)
    assert torch.isfinite(loss)
    low = seen["concat"]
    assert low.shape == (2, 9, 48, 8, 8)
    expected = engine.encode_video(engine.low_resolution(batch["mp4"]))
    torch.testing.assert_close(low, expected)
    assert not torch.allclose(low, engine.encode_video(batch["mp4"]))

    with pytest.raises(ValueError, match=r"lr_scale=4 must divide the frame size 30x30"):
        engine.shared_step({"mp4": torch.zeros(1, 9, 3, 30, 30), "txt": ["x"]})


def test_chunked_encode_decode_equals_unchunked():
    from tests.tiny import TINY_VAE_CONFIG
    from vdm.first_stage import CogVideoXVAE

    vae = CogVideoXVAE(config=TINY_VAE_CONFIG, sample_posterior=False)
    x = torch.rand(3, 3, 9, 16, 16) * 2 - 1
    results = []
    for chunk in (None, 1, 2):
        engine = VideoDiffusionEngine(nn.Identity(), None, None, vae, None, None, scale_factor=0.7,
                                      en_and_decode_n_samples_a_time=chunk)
        z = engine.encode_first_stage(x)
        results.append((z, engine.decode_first_stage(z)))
    for z, rec in results[1:]:
        torch.testing.assert_close(z, results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec, results[0][1], rtol=1e-5, atol=1e-5)
    assert results[0][0].shape == (3, vae.latent_channels, 3, 4, 4)


def test_disable_untrainable_params_prefixes_all_and_lora(tiny_cfg):
    engine = build_engine(tiny_cfg("+conditioner.embedders.0.is_trainable=true"))
    assert any(p.requires_grad for p in engine.conditioner.parameters())
    network_size = sum(p.numel() for p in engine.network.parameters())
    assert engine.disable_untrainable_params() == network_size  # conditioner and first stage frozen
    assert not any(p.requires_grad for p in engine.conditioner.parameters())

    engine = build_engine(tiny_cfg())
    engine.not_trainable_prefixes = ["all"]
    assert engine.disable_untrainable_params() == 0

    engine = build_engine(tiny_cfg("lora_train=true", "lora.rank=2"))
    trainable = engine.disable_untrainable_params()
    names = [n for n, p in engine.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert trainable == sum(p.numel() for n, p in engine.named_parameters() if "lora_" in n)


def test_lora_train_needs_adapters(tiny_cfg):
    engine = build_engine(tiny_cfg())
    with pytest.raises(ValueError, match="lora_train=true but the network has no LoRA adapters"):
        VideoDiffusionEngine(engine.network, engine.denoiser, engine.conditioner, engine.first_stage_model,
                             engine.loss_fn, engine.sampler_single, lora_train=True)
    with pytest.raises(ValueError, match="'nope' matches no module"):
        add_lora(engine.network, rank=2, target_modules=["nope"])


def test_first_stage_is_frozen_and_stays_in_eval(tiny_cfg):
    engine = build_engine(tiny_cfg())
    engine.train()
    assert not engine.first_stage_model.training
    assert all(not p.requires_grad for p in engine.first_stage_model.parameters())


def test_training_steps_reduce_the_loss(tiny_cfg):
    """A few AdamW steps on one fixed batch, fixed noise and timesteps: the loss falls."""
    engine = build_engine(tiny_cfg("conditioner.embedders.0.ucg_rate=0.0"))
    engine.disable_untrainable_params()
    opt = torch.optim.AdamW([p for p in engine.parameters() if p.requires_grad], lr=1e-2)
    batch = world_batch()
    x0 = engine.encode_video(batch["mp4"])
    noise, idx = torch.randn_like(x0), torch.tensor([250, 700])
    losses = []
    for _ in range(30):
        loss = engine.loss_fn(engine.model, engine.denoiser, engine.conditioner, x0, batch, noise=noise, idx=idx).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]


def test_sample_single_and_ddim_shapes_and_determinism(tiny_cfg):
    engine = build_engine(tiny_cfg("sampler.num_steps=3")).eval()
    batch = {"txt": ["a red square moving left", "a green circle moving up"]}
    cond, uc = engine.conditioner.get_unconditional_conditioning(batch, force_uc_zero_embeddings=["txt"])
    randn = torch.randn(2, 9, 48, 8, 8)
    a = engine.sample_single(cond, uc, randn, generator=torch.Generator().manual_seed(0))
    b = engine.sample_single(cond, uc, randn, generator=torch.Generator().manual_seed(0))
    assert a.shape == randn.shape and torch.equal(a, b)
    d = engine.sample_ddim(cond, uc, randn, num_steps=3)
    assert d.shape == randn.shape and torch.isfinite(d).all()
    assert engine.decode_video(d).shape == (2, 9, 3, 32, 32)


def test_switch_adaln_layer_on_the_engine_keeps_weights(tiny_cfg):
    engine = build_engine(tiny_cfg())
    state = {k: v.clone() for k, v in engine.state_dict().items()}
    engine.switch_adaln_layer("BaseAdaLNMixin")
    engine.switch_adaln_layer("base")
    assert all(torch.equal(state[k], v) for k, v in engine.state_dict().items())
    with pytest.raises(ValueError, match="unknown; valid names"):
        engine.switch_adaln_layer("KVSharingMaskGuidedAdaLNMixinTypo")


def test_use_pd_needs_a_discrete_denoiser_and_the_ddim_sampler(tiny_cfg):
    engine = build_engine(tiny_cfg("use_pd=true"))  # the default model can be distilled
    parts = dict(network=engine.network, conditioner=engine.conditioner, first_stage=engine.first_stage_model,
                 loss_fn=engine.loss_fn, sampler_single=engine.sampler_single, use_pd=True)
    with pytest.raises(ValueError, match="use_pd=true: progressive distillation needs a discrete denoiser"):
        VideoDiffusionEngine(denoiser=torch.nn.Identity(), sampler_ddim=engine.sampler_ddim, **parts)
    with pytest.raises(ValueError, match="use_pd=true: students sample with DDIM on the discretization's grid"):
        VideoDiffusionEngine(denoiser=engine.denoiser, sampler_ddim=None, **parts)


def test_mismatched_network_channels_are_named(tiny_cfg):
    with pytest.raises(ValueError, match=r"network.in_channels=16 does not match the first stage's latent channels \(48\)"):
        build_engine(tiny_cfg("+network.in_channels=16"))
