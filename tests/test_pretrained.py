"""CogVideoX presets and `pretrained=<dir>` for training: a tiny folder laid out like the released ones."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cogvideox_folder import VARIANTS, make_cogvideox_folder
from vdm.build import build_engine, compose
from vdm.data.video_io import read_mp4

TINY = VARIANTS["2b"]["transformer"]
SHRINK = [f"network.{k}={v}" for k, v in TINY.items()] + ["network.gradient_checkpointing=false",
                                                          f"conditioner.embedders.0.max_length={TINY['max_text_seq_length']}"]


@pytest.fixture(scope="module")
def cogvideox_dir(tmp_path_factory) -> Path:
    """A tiny folder laid out like the released CogVideoX-2b: nothing downloaded."""
    return make_cogvideox_folder(tmp_path_factory.mktemp("cogvideox") / "CogVideoX-2b", "2b")


@pytest.mark.parametrize("experiment", ["cogvideox_2b", "cogvideox_5b"])
def test_experiment_loads_every_part_from_the_folder(cogvideox_dir, experiment):
    overrides = list(SHRINK)
    if experiment == "cogvideox_5b":  # the tiny folder holds a sin-cos transformer: the 5B preset uses RoPE
        overrides.append("network.use_rotary_positional_embeddings=false")
    cfg = compose([f"experiment={experiment}", f"pretrained={cogvideox_dir}", "sampler.num_steps=2",
                   "sampler.verbose=false", *overrides])
    engine = build_engine(cfg)
    saved = load_file(cogvideox_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(engine.network.state_dict()[k], v) for k, v in saved.items())
    assert engine.scale_factor == (1.15258426 if experiment == "cogvideox_2b" else 0.7)
    assert engine.conditioner.embedders[0].encoder is None  # lazy: loaded on first use
    assert cfg.discretization.shift_scale == (3.0 if experiment == "cogvideox_2b" else 1.0)  # 5B: trained unshifted
    assert engine.first_stage_model.latent_channels == 4
    video = torch.rand(1, 9, 3, 24, 32) * 2 - 1
    loss, _ = engine.shared_step({"mp4": video, "txt": ["a red square"]})
    assert torch.isfinite(loss)
    cond, uc = engine.conditioning({"txt": ["a red square"]})
    assert type(engine.conditioner.embedders[0].encoder).__name__ == "T5EncoderModel"
    z = engine.sample_single(cond, uc, torch.randn(1, 3, 4, 6, 8))
    assert engine.decode_video(z).shape == (1, 9, 3, 24, 32)


def test_not_a_cogvideox_folder(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(ValueError, match="is not a CogVideoX folder: it has no model_index.json and no "
                                         "transformer/config.json"):
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
                              "network.attention_head_dim=32"]))
    with pytest.raises(ValueError, match=r"network.text_embed_dim=4096 does not match the conditioner's text width "
                                         r"\(20\)"):
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

    # sample.py checkpoint=<that LoRA run>: the base comes back from the folder the run recorded
    from vdm.sampling import sample

    out = sample(compose([f"checkpoint={tmp_path / 'runs' / 'lora'}", "prompts=a red square", "steps=2",
                          f"output_dir={tmp_path / 'samples'}", "sampler.verbose=false"], config_name="sample"))
    row = json.loads((out / "samples.jsonl").read_text())
    assert row["source"] == str(final) and row["guider"] == "DynamicCFG" and row["cfg"] == 6.0
    assert read_mp4(out / row["file"]).shape == (9, 24, 32, 3)
