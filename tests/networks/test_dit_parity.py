"""Parity of DiffusionTransformer with diffusers' CogVideoXTransformer3DModel (the reference)."""

import json
from dataclasses import asdict

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

from vdm.networks import DiffusionTransformer
from vdm.networks.diffusers_io import write_safetensors

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=24,
            text_embed_dim=20, num_layers=2, sample_width=8, sample_height=6, sample_frames=9,
            max_text_seq_length=7, patch_size=2)
CONFIGS = {
    "sincos_2b_like": dict(TINY),
    "rope_5b_like": dict(TINY, use_rotary_positional_embeddings=True, attention_head_dim=32),
}
# The image-to-video and CogVideoX 1.5 layouts: the image latent doubles the input channels; 5B-I2V adds a learned
# [text | video] position table to RoPE; 1.5 puts 2 latent frames in a token (a linear patch embedding) with
# sliced RoPE, and 1.5-I2V adds the ofs embedding.
FAMILY = {
    "i2v_5b_like": dict(CONFIGS["rope_5b_like"], in_channels=8, out_channels=4,
                        use_learned_positional_embeddings=True),
    "t2v_15_like": dict(CONFIGS["rope_5b_like"], patch_size_t=2, patch_bias=False),
    "i2v_15_like": dict(CONFIGS["rope_5b_like"], patch_size_t=2, patch_bias=False, in_channels=8,
                        out_channels=4, ofs_embed_dim=24),
}


def reference_model(config: dict, seed: int = 0) -> CogVideoXTransformer3DModel:
    """A tiny random diffusers model whose every parameter is perturbed, so no zero-init layer hides a bug."""
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        if model.config.use_learned_positional_embeddings:  # a saved buffer: learned values, unlike sin-cos
            model.patch_embed.pos_embedding.add_(torch.randn_like(model.patch_embed.pos_embedding) * 0.2)
    return model


def reference_forward(model, x, t, context):
    """The transformer called as diffusers' pipelines call it (their RoPE tables; 1.5-I2V's ofs = 2)."""
    c = model.config
    rope = None
    if c.use_rotary_positional_embeddings:
        h, w = x.shape[-2] // c.patch_size, x.shape[-1] // c.patch_size
        base_h, base_w = c.sample_height // c.patch_size, c.sample_width // c.patch_size
        if c.patch_size_t is None:
            crops = get_resize_crop_region_for_grid((h, w), base_w, base_h)
            rope = get_3d_rotary_pos_embed(c.attention_head_dim, crops, (h, w), x.shape[1])
        else:
            rope = get_3d_rotary_pos_embed(c.attention_head_dim, None, (h, w), x.shape[1] // c.patch_size_t,
                                           grid_type="slice", max_size=(base_h, base_w))
    ofs = x.new_full((1,), 2.0) if c.ofs_embed_dim else None
    return model(x, context, t, image_rotary_emb=rope, ofs=ofs, return_dict=False)[0]


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("latent_thw", [(3, 6, 8), (2, 4, 4)], ids=["full_size", "smaller"])
def test_from_pretrained_matches_diffusers(tmp_path, name, latent_thw):
    assert_loaded_matches_diffusers(tmp_path, name, CONFIGS[name], latent_thw)


def assert_loaded_matches_diffusers(tmp_path, name: str, config: dict, latent_thw: tuple[int, int, int]) -> None:
    """A random diffusers model saved and loaded by vdm gives diffusers' output (relative error < 1e-5)."""
    ref = reference_model(config)
    ref.save_pretrained(tmp_path / "transformer")
    ours = DiffusionTransformer.from_pretrained(tmp_path).eval()

    T, H, W = latent_thw
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, config["in_channels"], H, W, generator=g)
    context = torch.randn(2, config["max_text_seq_length"], config["text_embed_dim"], generator=g)
    t = torch.tensor([17, 803])
    with torch.no_grad():
        expected = reference_forward(ref, x, t, context)
        got = ours(x, t, context)
    assert got.shape == expected.shape == (2, T, config["out_channels"], H, W)
    err = relative_error(got, expected)
    print(f"{name} {latent_thw}: max relative error {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("name, latent_thw", [
    ("i2v_5b_like", (3, 6, 8)), ("i2v_5b_like", (2, 6, 8)),  # fewer frames: diffusers' sin-cos fallback
    ("t2v_15_like", (4, 6, 8)), ("t2v_15_like", (2, 4, 4)), ("i2v_15_like", (4, 6, 8)), ("i2v_15_like", (2, 4, 6)),
])
def test_the_family_matches_diffusers(tmp_path, name, latent_thw):
    assert_loaded_matches_diffusers(tmp_path, name, FAMILY[name], latent_thw)


def test_the_family_round_trips_through_save_pretrained(tmp_path):
    for name, config in FAMILY.items():
        torch.manual_seed(0)
        ours = DiffusionTransformer(**config).eval()
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        ours.save_pretrained(tmp_path / name)
        ref = CogVideoXTransformer3DModel.from_pretrained(tmp_path / name).eval()
        T = 4 if config.get("patch_size_t") else 3
        x, context, t = torch.randn(1, T, config["in_channels"], 6, 8), torch.randn(1, 7, 20), torch.tensor([500])
        with torch.no_grad():
            assert relative_error(ours(x, t, context), reference_forward(ref, x, t, context)) < 1e-5, name


def test_diffusers_misreads_a_folder_with_vdm_only_parts(tmp_path):
    """Why save_pretrained refuses head_hidden_dim > 0: such a folder, written anyway, loads in diffusers without
    an error but with proj_out randomly initialised, so diffusers' output is not the network's."""
    torch.manual_seed(0)
    ours = DiffusionTransformer(**CONFIGS["rope_5b_like"], head_hidden_dim=32).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    folder = tmp_path / "headed"
    folder.mkdir()
    config = {"_class_name": "CogVideoXTransformer3DModel", **asdict(ours.config)}
    (folder / "config.json").write_text(json.dumps(config))
    write_safetensors({k: v.contiguous() for k, v in ours.state_dict().items()}, folder, None)
    ref = CogVideoXTransformer3DModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()  # a warning, no error
    x, context, t = torch.randn(1, 3, 4, 6, 8), torch.randn(1, 7, 20), torch.tensor([500])
    with torch.no_grad():
        # proj_out is random there (or uninitialised memory: NaNs seen too): nowhere near the network's output
        assert not torch.allclose(ours(x, t, context), reference_forward(ref, x, t, context), rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="network.head_hidden_dim=32"):
        ours.save_pretrained(tmp_path / "refused")


def test_save_pretrained_loads_in_diffusers(tmp_path):
    torch.manual_seed(0)
    ours = DiffusionTransformer(**CONFIGS["rope_5b_like"]).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ours.save_pretrained(tmp_path / "out", max_shard_size=20_000)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1  # sharded with an index
    ref = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "out").eval()
    reloaded = DiffusionTransformer.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(1, 3, 4, 6, 8)
    context = torch.randn(1, 7, 20)
    t = torch.tensor([500])
    with torch.no_grad():
        expected = reference_forward(ref, x, t, context)
        assert relative_error(ours(x, t, context), expected) < 1e-5
        torch.testing.assert_close(reloaded(x, t, context), ours(x, t, context), rtol=1e-5, atol=1e-5)
    for k, v in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
