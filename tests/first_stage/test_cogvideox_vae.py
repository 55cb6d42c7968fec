import json
import re

import pytest
import torch

from vdm.first_stage import CogVideoXVAE

# 3 blocks: spatial factor 4; temporal ratio 4 (two time-compressing blocks). Runs in milliseconds on CPU.
TINY = {
    "block_out_channels": (8, 8, 8),
    "down_block_types": ("CogVideoXDownBlock3D",) * 3,
    "up_block_types": ("CogVideoXUpBlock3D",) * 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "temporal_compression_ratio": 4,
    "sample_height": 16,
    "sample_width": 16,
}


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return CogVideoXVAE(config=TINY).eval()


def video(frames: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, frames, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, 5, 9, 17])
def test_encode_shape(vae, frames):
    z = vae.encode(video(frames))
    assert z.shape == (2, 4, (frames - 1) // 4 + 1, 4, 4)
    assert (vae.latent_channels, vae.spatial_compression, vae.temporal_compression) == (4, 4, 4)


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, 9, 17])
def test_decode_shape(vae, frames):
    vae.sample_posterior = False
    assert vae.decode(vae.encode(video(frames))).shape == (2, 3, frames, 16, 16)


@torch.no_grad()
def test_mode_is_deterministic_and_sample_is_seeded(vae):
    x = video(9)
    vae.sample_posterior = False
    assert torch.equal(vae.encode(x), vae.encode(x))
    mode = vae.encode(x)
    vae.sample_posterior = True
    a = vae.encode(x, generator=torch.Generator().manual_seed(1))
    b = vae.encode(x, generator=torch.Generator().manual_seed(1))
    c = vae.encode(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, mode)


@torch.no_grad()
def test_load_from_folder_matches_inline(vae, tmp_path):
    vae.vae.save_pretrained(tmp_path / "vae")
    x = video(9)
    vae.sample_posterior = False
    z = vae.encode(x)
    for loaded in (
        CogVideoXVAE(path=tmp_path / "vae", sample_posterior=False),
        CogVideoXVAE(path=tmp_path, subfolder="vae", sample_posterior=False),
    ):
        loaded.eval()
        assert torch.equal(loaded.encode(x), z)
        assert torch.equal(loaded.decode(z), vae.decode(z))


def test_tiling_and_slicing_reach_diffusers_model():
    plain = CogVideoXVAE(config=TINY)
    assert not plain.vae.use_tiling and not plain.vae.use_slicing
    switched = CogVideoXVAE(config=TINY, enable_tiling=True, enable_slicing=True)
    assert switched.vae.use_tiling and switched.vae.use_slicing


def test_bad_frame_count(vae):
    with pytest.raises(ValueError, match=r"got 6 frames.*r=4: 1, 5, 9, 13"):
        vae.encode(video(6))
    with pytest.raises(ValueError, match="got 2 latent frames"):
        vae.decode(torch.zeros(1, 4, 2, 4, 4))


def test_bad_folder_names_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        CogVideoXVAE(path=missing)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        CogVideoXVAE(path=tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match=re.escape(f"'{tmp_path}' holds a 'AutoencoderKL' config")):
        CogVideoXVAE(path=tmp_path)


def test_exactly_one_source_and_unknown_config_key(tmp_path):
    with pytest.raises(ValueError, match="exactly one of path"):
        CogVideoXVAE()
    with pytest.raises(ValueError, match="exactly one of path"):
        CogVideoXVAE(path=tmp_path, config=TINY)
    with pytest.raises(ValueError, match=r"unknown keys \['latent_chanels'\]"):
        CogVideoXVAE(config={**TINY, "latent_chanels": 4})
