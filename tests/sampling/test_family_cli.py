"""The CogVideoX family beyond 1.0 text-to-video through the CLI, against diffusers' own pipelines on tiny folders
that diffusers wrote, laid out like the released ones: `sample.py pretrained=<folder> ...` and the matching
pipeline (CogVideoXPipeline for 1.5, CogVideoXImageToVideoPipeline for the I2V models) on the same folder, with
zero negative embeddings and the pipeline's generator seeded with the job's seed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline
from safetensors.torch import load_file

from tests.cogvideox_folder import FAMILY_VARIANTS, make_cogvideox_folder
from vdm.data.video_io import read_mp4

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a panda playing guitar in a bamboo forest"
STEPS, SCALE, SEED = 10, 6.0, 0


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    return {name: make_cogvideox_folder(root / name, name) for name in FAMILY_VARIANTS}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def pipeline_outputs(pipe, dynamic: bool, **inputs) -> tuple[torch.Tensor, np.ndarray]:
    """The pipeline's final latents (1, T, C, H, W) (1.5: with its front padding) and frames (F, H, W, 3)."""
    pipe.set_progress_bar_config(disable=True)
    c = pipe.transformer.config
    cond, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=c.max_text_seq_length)
    kwargs = dict(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond), num_frames=c.sample_frames,
                  num_inference_steps=STEPS,
                  guidance_scale=SCALE, use_dynamic_cfg=dynamic, **inputs)
    with torch.no_grad():
        latents = pipe(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="latent").frames
        frames = pipe(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="np").frames[0]
    return latents, frames


def compare(out: Path, expected_latents: torch.Tensor, expected_frames: np.ndarray, name: str) -> None:
    row = json.loads((out / "samples.jsonl").read_text())
    latent = load_file(out / row["latent"])["latent"]
    expected = expected_latents[0, expected_latents.shape[1] - latent.shape[0]:]  # the decoded ones
    assert latent.shape == expected.shape
    rel = ((latent - expected).abs().max() / expected.abs().max()).item()
    frames = read_mp4(out / row["file"])
    assert frames.shape == expected_frames.shape
    pixel_err = np.abs(frames.astype(np.float64) - expected_frames * 255).max()
    print(f"{name}: latent relative error {rel:.2e}, max frame error {pixel_err:.2f}/255")
    assert rel <= 1e-4
    assert pixel_err <= 2


@pytest.mark.parametrize("dynamic", [False, True], ids=["cfg", "dynamic_cfg"])
def test_cogvideox_15_text_to_video_matches_the_pipeline(folders, tmp_path, dynamic):
    folder = folders["15_t2v"]
    out = tmp_path / "out"
    result = run_cli(f"pretrained={folder}", f"prompts=[{PROMPT}]", "sampler=ddim",
                     f"guider={'dynamic_cfg' if dynamic else 'cfg'}", f"cfg={SCALE}", f"steps={STEPS}", f"seed={SEED}",
                     "rescale=full", "save_latents=true", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    latents, frames = pipeline_outputs(CogVideoXPipeline.from_pretrained(folder), dynamic)
    assert latents.shape[1] == 4  # 3 latent frames (9 pixel frames) sampled as 4: one padding latent in front
    compare(out, latents, frames, "1.5 T2V")
    assert json.loads((out / "samples.jsonl").read_text())["fps"] == 16
