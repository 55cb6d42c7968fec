"""Every kind of job from a released-layout CogVideoX folder with no training run: prompt files, multi-prompt
videos (both schedules), edit and reweight; half-precision sampling and a compiled network."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cogvideox_folder import make_cogvideox_folder
from vdm.build import compose
from vdm.data.video_io import read_mp4
from vdm.sampling import load_model, make_sampler, sample, sample_latents
from vdm.sampling.load import latent_shape

WINDOW = "control_options={start_step:1,end_step:3,start_layer:0,end_layer:2}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_cogvideox_folder(tmp_path_factory.mktemp("modes") / "CogVideoX-5b", "5b")


def run(folder: Path, out: Path, *overrides: str) -> list[dict]:
    sample(compose([f"pretrained={folder}", "steps=4", f"output_dir={out}", "sampler.verbose=false", *overrides],
                   config_name="sample"))
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_multi_prompt_videos_from_a_prompts_file_with_both_schedules(folder, tmp_path):
    cases = tmp_path / "cases.txt"
    cases.write_text("a red square moving right | a blue circle moving up\n")
    common = [f"prompts_file={cases}", "overlap_size=1", "num_transition_blocks=0",
              "adaln=[base,kv_sharing_mask_guided]", WINDOW,
              "control_options.ref_token_idx=[1]", "control_options.cur_token_idx=[1]", "save_latents=true"]
    reuse = run(folder, tmp_path / "reuse", *common, "reuse=true")
    reference = run(folder, tmp_path / "reference", *common, "reuse=false")
    assert [r["control"] for r in reuse] == ["base", "kv_sharing_mask_guided"]
    for a, b in zip(reuse, reference):  # 2 segments of 3 latent frames overlapping by 1: 5 latent frames
        assert read_mp4(tmp_path / "reuse" / a["file"]).shape[0] == 17 and a["frames"] == 5
        torch.testing.assert_close(load_file(tmp_path / "reuse" / a["latent"])["latent"],
                                   load_file(tmp_path / "reference" / b["latent"])["latent"], rtol=0, atol=1e-5)


def test_edit_and_reweight_from_a_folder(folder, tmp_path):
    edit = run(folder, tmp_path / "edit", "mode=edit", "prompts=[a red square moving right,a blue square moving right]",
               "adaln=[kv_sharing]", WINDOW)
    assert [r["role"] for r in edit] == ["source", "target"]
    reweight = run(folder, tmp_path / "reweight", "mode=reweight", "prompts=a red square moving right", WINDOW,
                   "reweight_token_idx=2", "reweight_scale=3")
    assert [r["control"] for r in reweight] == ["reweight", "reweight"]
    assert all(read_mp4(tmp_path / "reweight" / r["file"]).shape == (9, 24, 32, 3) for r in reweight)


def latents_with(folder: Path, dtype: torch.dtype, compile_model: bool = False):
    loaded = load_model(str(folder), None, "runs", dtype=dtype, compile_model=compile_model)
    sampler = make_sampler(loaded.config, compose(["sampler=ddim", "sampler.verbose=false"]).sampler, 4)
    shape = latent_shape(loaded.engine, None, None, None)
    return loaded.engine, sample_latents(loaded.engine, sampler, ["a panda playing guitar"], [3], shape)


def test_bf16_sampling_keeps_the_sampler_in_float32(folder):
    engine, latents = latents_with(folder, torch.bfloat16)
    assert latents.dtype == torch.float32  # the sampler's running latent and arithmetic
    assert {p.dtype for p in engine.network.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in engine.first_stage_model.parameters()} == {torch.bfloat16}
    assert engine.conditioner.embedders[0].encoder.dtype == torch.bfloat16  # the T5, loaded in bf16
    assert engine.denoiser.alpha_cumprod_sqrt.dtype == torch.float32
    assert engine.decode_video(latents).dtype == torch.bfloat16
    _, reference = latents_with(folder, torch.float32)
    rel = ((latents - reference).abs().max() / reference.abs().max()).item()
    assert 0 < rel < 5e-2, rel


@pytest.mark.slow  # ~40 s of compilation; make test keeps the compiled-vs-eager control test (test_dit_speed_paths)
def test_compiled_network_samples_the_same_and_keeps_its_names(folder):
    eager_engine, eager = latents_with(folder, torch.float32)
    engine, compiled = latents_with(folder, torch.float32, compile_model=True)
    assert engine.network._compiled_call_impl is not None  # nn.Module.compile: in place
    names = list(engine.state_dict())
    assert len(names) == len(set(names)) and set(names) == set(eager_engine.state_dict())
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
