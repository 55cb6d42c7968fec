"""`sample.py pretrained=<CogVideoX folder>` end to end through the CLI, against diffusers' CogVideoXPipeline
on the same folder: the saved latent and the mp4's frames."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline
from safetensors.torch import load_file

from tests.cogvideox_folder import VARIANTS, make_cogvideox_folder
from vdm.data.video_io import read_mp4

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a panda playing guitar in a bamboo forest"
STEPS, SCALE, SEED = 10, 6.0, 0


@pytest.fixture(scope="module", params=list(VARIANTS))
def folder(request, tmp_path_factory) -> Path:
    return make_cogvideox_folder(tmp_path_factory.mktemp(f"cogvideox_{request.param}") / "CogVideoX", request.param)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def pipeline_outputs(folder: Path) -> tuple[torch.Tensor, np.ndarray]:
    """The pipeline's final latents (1, T, C, H, W) and frames (T, H, W, 3) in [0, 1], with the folder's
    DDIM scheduler, the prompt embedded by the folder's T5 and all-zero negative embeddings."""
    pipe = CogVideoXPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, CogVideoXDDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    c = pipe.transformer.config
    cond, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False,
                                 max_sequence_length=c.max_text_seq_length)
    kwargs = dict(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond), num_frames=c.sample_frames,
                  num_inference_steps=STEPS, guidance_scale=SCALE, use_dynamic_cfg=False)
    with torch.no_grad():
        latents = pipe(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="latent").frames
        frames = pipe(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="np").frames[0]
    return latents, frames


def test_cli_matches_the_diffusers_pipeline(folder, tmp_path):
    out = tmp_path / "out"
    result = run_cli(f"pretrained={folder}", f"prompts=[{PROMPT}]", "sampler=ddim", "guider=cfg", f"cfg={SCALE}",
                     f"steps={STEPS}", f"seed={SEED}", "rescale=full", "save_latents=true", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads((out / "samples.jsonl").read_text())
    assert row["sampler"] == "VideoDDIMSampler" and row["cfg"] == SCALE and row["guider"] == "VanillaCFG"

    expected_latents, expected_frames = pipeline_outputs(folder)
    latent = load_file(out / row["latent"])["latent"]
    assert latent.shape == expected_latents.shape[1:]
    rel = ((latent - expected_latents[0]).abs().max() / expected_latents.abs().max()).item()
    frames = read_mp4(out / row["file"])
    assert frames.shape == expected_frames.shape  # 9 frames of 24x32: the transformer's sample size
    pixel_err = np.abs(frames.astype(np.float64) - expected_frames * 255).max()
    print(f"{folder.parent.name}: latent relative error {rel:.2e}, max frame error {pixel_err:.2f}/255")
    assert rel <= 1e-4
    assert pixel_err <= 2


def test_the_folder_sets_scaling_schedule_and_defaults(folder, tmp_path):
    """VAE scaling factor and SNR shift come from the folder; CogVideoX's sampling defaults (DPM++, dynamic
    CFG 6, SAT's subset rescale, the network's frame count, 8 fps) apply when nothing is given."""
    from vdm.build import build_engine
    from vdm.pretrained import engine_config, read_folder

    spec = VARIANTS[folder.parent.name.split("_")[1][:2]]
    config = engine_config(read_folder(folder))
    assert config.first_stage.scale_factor == spec["scaling_factor"]
    assert config.discretization.shift_scale == spec["snr_shift_scale"]
    assert config.discretization.rescale == "subset"
    assert config.network.use_rotary_positional_embeddings == ("use_rotary_positional_embeddings" in
                                                                spec["transformer"])
    assert config.conditioner.embedders[0].max_length == spec["transformer"]["max_text_seq_length"]
    assert build_engine(config).scale_factor == spec["scaling_factor"]

    out = tmp_path / "defaults"
    result = run_cli(f"pretrained={folder}", f"prompts=[{PROMPT}]", "steps=3", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads((out / "samples.jsonl").read_text())
    assert (row["sampler"], row["guider"], row["cfg"], row["fps"]) == ("VPSDEDPMPP2MSampler", "DynamicCFG", 6.0, 8)
    assert read_mp4(out / row["file"]).shape[0] == spec["transformer"]["sample_frames"]
