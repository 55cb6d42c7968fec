"""The CogVideoX training presets compose, build and train (media step included) at tiny size from folders
laid out like the released CogVideoX-2b, -5b, -5b-I2V, 1.5-5B and 1.5-5B-I2V; only sizes are overridden."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.cogvideox_folder import FAMILY_VARIANTS, VARIANTS, make_cogvideox_folder
from vdm import build
from vdm.build import compose
from vdm.conditioning.image import ImageLatents
from vdm.training import loop

PRESETS = {  # experiment: (variant, LoRA)
    "cogvideox_2b_lora": ("2b", True), "cogvideox_5b_lora": ("5b", True),
    "cogvideox_2b_sft": ("2b", False), "cogvideox_5b_sft": ("5b", False),
    "cogvideox_5b_i2v_lora": ("5b_i2v", True), "cogvideox_5b_i2v_sft": ("5b_i2v", False),
    "cogvideox15_5b_lora": ("15_t2v", True), "cogvideox15_5b_sft": ("15_t2v", False),
    "cogvideox15_5b_i2v_lora": ("15_i2v", True), "cogvideox15_5b_i2v_sft": ("15_i2v", False),
}
MODEL = {"2b": {}, "5b": {}, "5b_i2v": {"image_to_video": True}, "15_t2v": {"network.patch_size_t": 2},
         "15_i2v": {"image_to_video": True, "network.patch_size_t": 2, "network.ofs_embed_dim": 512}}


def shrink(variant: str) -> list[str]:
    """The tiny folder's transformer sizes, 25 frames (7 latent frames; 1.5: padded to 8) at 16x16, 2 steps;
    5B-I2V at its learned table's own size (9 frames at 24x32)."""
    tiny = {**VARIANTS, **FAMILY_VARIANTS}[variant]["transformer"]
    size = (["data.num_frames=9", "data.height=24", "data.width=32"] if variant == "5b_i2v" else
            ["network.sample_frames=25", "data.num_frames=25", "data.height=16", "data.width=16"])
    return [*(f"network.{k}={v}" for k, v in tiny.items()), *size,
            f"conditioner.embedders.0.max_length={tiny['max_text_seq_length']}",
            "max_steps=2", "checkpoint.every=null", "sampler.verbose=false"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("presets")
    return {variant: make_cogvideox_folder(root / f"CogVideoX-{variant}", variant)
            for variant in {variant for variant, _ in PRESETS.values()}}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    from vdm.data.video_io import write_mp4

    folder = tmp_path_factory.mktemp("videos")
    for i in range(2):
        frames = np.zeros((25, 20, 24, 3), np.uint8)
        frames[:, 4:12, 2 * i: 2 * i + 8] = (200, 60 * i, 10)
        write_mp4(folder / f"clip{i}.mp4", frames, fps=8)
    (folder / "prompts.txt").write_text("a red block\na yellow block\n")
    (folder / "videos.txt").write_text("clip0.mp4\nclip1.mp4\n")
    return folder


def test_presets_state_the_recipe():
    for experiment, (_, lora) in PRESETS.items():
        cfg = compose([f"experiment={experiment}", "pretrained=/models/x", "data.root=/videos"], config_name="train")
        recipe = (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.weight_decay, cfg.clip_grad_norm)
        assert recipe == ((1e-3 if lora else 1e-5), [0.9, 0.95], 1e-4, 0.1), experiment
        assert (cfg.mixed_precision, cfg.batch_size, cfg.network.gradient_checkpointing, cfg.ema.enabled) == \
            ("bf16", 1, True, False), experiment
        assert cfg.lora_train == lora and (not lora or cfg.lora.rank == 128) and cfg.fsdp == (not lora), experiment
        assert (cfg.video_samples, cfg.video_latent_frames, cfg.video_offload) == (1, 5, True), experiment
        assert cfg.network.num_layers == (30 if "2b" in experiment else 42)
        variant = PRESETS[experiment][0]
        assert all(OmegaConf.select(cfg, k) == v for k, v in MODEL[variant].items()), experiment
        assert cfg.image_dropout == (0.05 if "i2v" in variant else 0.0), experiment
        assert cfg.network.in_channels == (32 if "i2v" in variant else 16), experiment
        assert cfg.network.get("use_learned_positional_embeddings", False) == (variant == "5b_i2v"), experiment
        assert (cfg.data.num_frames, cfg.data.height, cfg.data.width, cfg.data.fps) == \
            ((81, 768, 1360, 16.0) if "15" in variant else (49, 480, 720, 8.0)), experiment
        assert build.config_variant(cfg) == {"15_t2v": "cogvideox15_5b", "15_i2v": "cogvideox15_5b_i2v"}.get(
            variant, f"cogvideox_{variant}"), experiment


def test_a_folder_of_another_model_is_refused_in_one_line_naming_its_presets(folders, videos, tmp_path):
    cfg = compose(["experiment=cogvideox_5b_lora", f"pretrained={folders['15_i2v']}", f"data.root={videos}",
                   f"runs_root={tmp_path}", "run_name=run", *shrink("5b")], config_name="train")
    with pytest.raises(ValueError, match=r"is cogvideox15_5b_i2v but the config describes cogvideox_5b: train it "
                                         r"with experiment=cogvideox15_5b_i2v_lora or experiment=cogvideox15_5b_i2v_sft"):
        loop.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("experiment", list(PRESETS))
def test_preset_trains_at_tiny_size(experiment, folders, videos, tmp_path, monkeypatch):
    variant, lora = PRESETS[experiment]
    built = []
    real_build = loop.build_engine
    monkeypatch.setattr(loop, "build_engine", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    cfg = compose([f"experiment={experiment}", f"pretrained={folders[variant]}", f"data.root={videos}",
                   f"runs_root={tmp_path}", "run_name=run", *shrink(variant)], config_name="train")
    final = loop.train(cfg, tmp_path / "run")

    (engine,) = built
    saved = load_file(final / "model.safetensors")
    base = load_file(folders[variant] / "transformer" / "diffusion_pytorch_model.safetensors")
    if lora:  # adapters alone, over a frozen bf16 base
        assert saved and all("lora_" in k for k in saved)
        assert {p.dtype for k, p in engine.network.named_parameters() if "lora_" not in k} == {torch.bfloat16}
    else:  # the whole network, trained in float32
        assert saved.keys() == base.keys() and all(v.dtype == torch.float32 for v in saved.values())
        assert any(not torch.equal(saved[k], base[k]) for k in base)
    assert {p.dtype for p in engine.first_stage_model.parameters()} == {torch.bfloat16}
    assert not engine.offload  # the media step put the T5 and VAE back

    image = [e for e in engine.conditioner.embedders if isinstance(e, ImageLatents)]
    assert [e.ucg_rate for e in image] == ([0.05] if "i2v" in variant else [])

    # the media step: a 17-frame clip (5 latent frames of the 7 trained on; 1.5: sampled as 6, 5 decoded) in bf16;
    # 5B-I2V: its whole 9-frame clip
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0})
    events.Reload()
    for key in ("video/samples", "video/reconstructions"):
        gif = Image.open(io.BytesIO(events.Images(key)[-1].encoded_image_string))
        assert gif.n_frames == (9 if variant == "5b_i2v" else 17), key
