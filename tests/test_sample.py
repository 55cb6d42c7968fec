"""sample.py: videos from a trained run, samples.jsonl, latents, super-resolution, and refusals."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_NETWORK
from vdm.build import compose
from vdm.data.synthetic import render_clip
from vdm.data.video_io import read_mp4, write_mp4
from vdm.networks.kv_sharing import default_step_window
from vdm.sampling import sample as sample_videos
from vdm.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def trained_run(tmp_path: Path, *overrides: str) -> Path:
    cfg = compose(TINY_NETWORK + [f"runs_root={tmp_path / 'runs'}", "run_name=model", "batch_size=2", "max_steps=2",
                                  "video_every=0", *overrides], config_name="train")
    run_dir = tmp_path / "runs" / "model"
    train(cfg, run_dir)
    return run_dir


def sample_cfg(tmp_path: Path, *overrides: str):
    return compose([f"runs_root={tmp_path / 'runs'}", "steps=2", f"output_dir={tmp_path / 'out'}", *overrides],
                   config_name="sample")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory.mktemp("sample"))


def test_sample_writes_mp4s_jsonl_and_latents(run_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moving right\n\na blue circle moving up\n")
    out = sample_videos(sample_cfg(tmp_path, f"checkpoint={run_dir}", f"prompts_file={prompts}", "num_samples=2",
                                "save_latents=true", "sampler=ddim"))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompts"] for r in rows] == [["a red square moving right"]] * 2 + [["a blue circle moving up"]] * 2
    assert [r["seed"] for r in rows] == [42, 43, 44, 45]  # seed 42 + i, the reference's default
    assert all(r["sampler"] == "VideoDDIMSampler" and r["steps"] == 2 and r["cfg"] is None for r in rows)
    assert all(r["guider"] == "IdentityGuider" for r in rows)  # the synthetic world samples unguided
    for r in rows:
        frames = read_mp4(out / r["file"])
        assert frames.shape == (9, 32, 32, 3) and frames.dtype == np.uint8
        assert load_file(out / r["latent"])["latent"].shape == (9, 48, 8, 8)


def test_the_latest_run_is_the_default_and_seeds_reproduce(run_dir, tmp_path):
    runs_root = run_dir.parent
    a = sample_videos(compose([f"runs_root={runs_root}", "steps=2", f"output_dir={tmp_path / 'a'}", "save_latents=true",
                            "prompts=a green circle moving left"], config_name="sample"))
    b = sample_videos(compose([f"runs_root={runs_root}", "steps=2", f"output_dir={tmp_path / 'b'}", "save_latents=true",
                            "prompts=a green circle moving left"], config_name="sample"))
    assert torch.equal(load_file(a / "sample_0000.safetensors")["latent"], load_file(b / "sample_0000.safetensors")["latent"])


def test_existing_output_is_never_overwritten(run_dir, tmp_path):
    cfg = sample_cfg(tmp_path, f"checkpoint={run_dir}", "prompts=a red square moving right")
    out = sample_videos(cfg)
    before = (out / "sample_0000.mp4").read_bytes()
    with pytest.raises(FileExistsError, match="samples.jsonl already exists; choose another output_dir"):
        sample_videos(cfg)
    assert (out / "sample_0000.mp4").read_bytes() == before


@pytest.mark.parametrize("overrides, message", [
    (["prompts=[]"], "prompts must be a non-empty list of non-empty strings"),
    (["prompts=['  ']"], "prompts must be a non-empty list of non-empty strings"),
    ([], "give exactly one of prompts or prompts_file"),
    (["prompts_file=/nonexistent/prompts.txt"], "prompts_file=/nonexistent/prompts.txt: no such file"),
    (["prompts=x", "checkpoint=/nonexistent/run"], "/nonexistent/run: no such run or checkpoint folder"),
    (["prompts=x", "num_frames=12"], "the network takes at most 9x8x8 \\(9 frames of 32x32\\)"),
    (["prompts=x", "width=30"], "width=30 must be a positive multiple of the first stage's spatial compression 4"),
])
def test_bad_input_is_named(run_dir, tmp_path, overrides, message):
    overrides = [o for o in overrides]
    if not any(o.startswith("checkpoint=") for o in overrides):
        overrides.append(f"checkpoint={run_dir}")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sample_videos(sample_cfg(tmp_path, *overrides))
    assert not (tmp_path / "out" / "samples.jsonl").exists()


def test_unknown_sampler_lists_the_options(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="Could not find 'sampler/euler'"):
        sample_cfg(tmp_path, "prompts=x", "sampler=euler")


def test_no_run_at_all(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training run with a checkpoint under .*train one with"):
        sample_videos(sample_cfg(tmp_path, "prompts=x"))


def test_cli_exits_non_zero_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "sample.py", "prompts=[]", f"runs_root={tmp_path}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: prompts must be a non-empty list")


def test_super_resolution_upscales_a_low_resolution_clip(tmp_path):
    run_dir = trained_run(tmp_path, "lr_scale=4")
    clip = render_clip("red", "square", "right", (4, 10))[:, ::4, ::4]  # 9 x 8 x 8 low-resolution frames
    write_mp4(tmp_path / "low.mp4", np.ascontiguousarray(clip))
    out = sample_videos(sample_cfg(tmp_path, f"checkpoint={run_dir}", "prompts=a red square moving right",
                                f"lr_video={tmp_path / 'low.mp4'}"))
    assert read_mp4(out / "sample_0000.mp4").shape == (9, 32, 32, 3)
    write_mp4(tmp_path / "wrong.mp4", np.zeros((9, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="is 16x16; with lr_scale=4 it must be 8x8"):
        sample_videos(sample_cfg(tmp_path, f"checkpoint={run_dir}", "prompts=x", f"lr_video={tmp_path / 'wrong.mp4'}",
                              f"output_dir={tmp_path / 'out2'}"))


# -- multi-prompt, controls, editing ------------------------------------------------------------------

WINDOW = "control_options={start_step:1,end_step:3}"  # steps 1..3 of 4 (the scaled default would be 0..2)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_several_prompts_make_one_long_video_per_control(run_dir, tmp_path):
    out = sample_videos(sample_cfg(tmp_path, f"checkpoint={run_dir}", "steps=4", "overlap_size=6", WINDOW,
                                "prompts=[a red square moving right,a red square moving down]",
                                "control=[base,kv_sharing]"))
    rows = rows_of(out)
    assert [r["control"] for r in rows] == ["base", "kv_sharing"]
    assert rows[0]["seed"] == rows[1]["seed"]  # side by side: the same noise for every control
    assert all(r["prompts"] == ["a red square moving right", "a red square moving down"] for r in rows)
    for r in rows:  # 2 segments of 9 frames overlapping by 6
        assert read_mp4(out / r["file"]).shape == (12, 32, 32, 3) and r["frames"] == 12


def test_prompts_file_lines_and_yaml_case_file(run_dir, tmp_path):
    txt = tmp_path / "cases.txt"
    txt.write_text("a red square moving right | a red square moving down | a red square moving left\n"
                   "a blue circle moving up\n")
    out = sample_videos(sample_cfg(tmp_path, f"checkpoint={run_dir}", "steps=2", f"prompts_file={txt}",
                                "num_transition_blocks=0", "adaln=[base]"))
    rows = rows_of(out)
    assert [len(r["prompts"]) for r in rows] == [3, 1]
    assert read_mp4(out / rows[0]["file"]).shape[0] == 9 + 2 * 3
    case = tmp_path / "case.yaml"
    case.write_text("prompts:\n  - a green circle moving left\n  - a green circle moving up\n")
    out = sample_videos(sample_cfg(tmp_path, f"checkpoint={run_dir}", "steps=2", f"prompts_file={case}",
                                "num_transition_blocks=1", "adaln=[base]", f"output_dir={tmp_path / 'yaml'}"))
    assert read_mp4(out / rows_of(out)[0]["file"]).shape[0] == 9 + 2 * 3  # 3 segments: P1, transition, P2


def test_edit_mode_writes_source_and_target_from_the_same_noise(run_dir, tmp_path):
    same = sample_videos(sample_cfg(tmp_path, f"checkpoint={run_dir}", "steps=4", "mode=edit", WINDOW,
                                 "prompts=[a red square moving right,a red square moving right]", "adaln=[kv_sharing]",
                                 "save_latents=true"))
    a, b = (load_file(same / f)["latent"] for f in ("sample_0000.safetensors", "sample_0000_target.safetensors"))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # same prompt, same noise, shared K/V: same video
    edit = sample_videos(sample_cfg(tmp_path, f"checkpoint={run_dir}", "steps=4", "mode=edit", WINDOW,
                                 "prompts=[a red square moving right,a blue square moving right]",
                                 "adaln=[kv_sharing]", f"output_dir={tmp_path / 'edit'}"))
    rows = rows_of(edit)
    assert [r["role"] for r in rows] == ["source", "target"] and rows[1]["prompts"] == ["a blue square moving right"]


def test_reweight_mode(run_dir, tmp_path):
    out = sample_videos(sample_cfg(tmp_path, f"checkpoint={run_dir}", "steps=4", "mode=reweight", WINDOW,
                                "prompts=a red square moving right", "reweight_token_idx=2", "reweight_scale=3"))
    assert [r["control"] for r in rows_of(out)] == ["reweight", "reweight"]


def test_the_default_step_window_scales_to_the_steps_and_control_keys_are_declared(run_dir, tmp_path):
    """No window given: the reference's steps 2..25 of 50 at the job's steps (0..4 of 8), layers as before; a
    documented control_options.* key is set without '+'."""
    assert [default_step_window(n) for n in (50, 8, 4, 1, 100)] == [(2, 25), (0, 4), (0, 2), (0, 1), (4, 50)]
    three = "prompts=[a red square moving right,a red circle moving down,a red square moving left]"
    out = sample_videos(sample_cfg(tmp_path, f"checkpoint={run_dir}", "steps=8", three, "adaln=[kv_sharing]"))
    assert rows_of(out)[0]["control_options"] == {"start_step": 0, "end_step": 4}
    out = sample_videos(sample_cfg(tmp_path, f"checkpoint={run_dir}", "steps=8", three, "adaln=[kv_sharing]",
                                   "control_options.end_step=7", f"output_dir={tmp_path / 'seven'}"))
    assert rows_of(out)[0]["control_options"] == {"start_step": 0, "end_step": 7}


@pytest.mark.parametrize("overrides, message", [
    (["overlap_size=9"], r"overlap_size=9 must be in 0..8 \(below tile_size=9\)"),
    (["tile_size=12"], "tile_size=12 exceeds the network's 9 latent frames"),
    (["prompts=a red square moving right", "num_transition_blocks=2"], "num_transition_blocks=2 needs at least two"),
    (["adaln=[kv_sharing]", "control_options={start_step:1,end_step:30}"], "end_step=30"),
    (["adaln=[kv_sharing]", "control_options.end_step=5"], r"end_step=5 is outside the sampler's 4 steps \(valid 1..4\)"),
    (["adaln=[kv_sharing]", "control_options={start_step:1,end_step:3,end_layer:9}"], "end_layer=9"),
    (["adaln=[kv_sharing_mask_guided]", "control_options={start_step:1,end_step:3,ref_token_idx:[40],cur_token_idx:[1]}"],
     r"ref_token_idx=40 is beyond the text length 8 \(valid 0..7\)"),
    (["adaln=[nope]"], "adaln=\\['nope'\\]: valid controls are base"),
    (["mode=edit", "prompts=a red square moving right"], "mode=edit takes exactly two prompts"),
])
def test_multi_prompt_bad_input(run_dir, tmp_path, overrides, message):
    base = ["steps=4", "prompts=[a red square moving right,a red square moving down]"]
    if any(o.startswith("prompts=") for o in overrides):
        base = base[:1]
    with pytest.raises(ValueError, match=message):
        sample_videos(sample_cfg(tmp_path, f"checkpoint={run_dir}", *base, *overrides))
    assert not (tmp_path / "out").exists()


def test_unreadable_checkpoint_is_named(run_dir, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    step = sorted((broken / "checkpoints").iterdir())[-1]
    for name in ("model.safetensors", "ema.safetensors"):
        (step / name).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"ema.safetensors: not a readable safetensors file"):
        sample_videos(sample_cfg(tmp_path, f"checkpoint={broken}", "prompts=x"))
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        sample_videos(sample_cfg(tmp_path, f"checkpoint={broken}", "prompts=x", "use_ema=false"))


def test_sde_videos_reproduce_per_seed_whatever_the_batch(run_dir, tmp_path):
    """The default DPM++ SDE draws fresh noise every step: each video's draws come from its own seed."""
    latents = {}
    for batch_size in (1, 3):
        out = sample_videos(sample_cfg(tmp_path, f"checkpoint={run_dir}", "steps=3", "num_samples=3", "save_latents=true",
                                       "prompts=a red square moving right", f"batch_size={batch_size}",
                                       f"output_dir={tmp_path / str(batch_size)}"))
        latents[batch_size] = [load_file(out / f"sample_{i:04d}.safetensors")["latent"] for i in range(3)]
    for a, b in zip(latents[1], latents[3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.allclose(latents[1][0], latents[1][1])


def test_every_sampler_of_a_run_takes_the_jobs_guider_cfg_and_rescale(run_dir):
    """A run's config.yaml is stored resolved: its samplers hold copies of the guider and discretization,
    which guider=, cfg= and rescale= must still replace (the multi-prompt sampler once kept CFG 1.5)."""
    from omegaconf import OmegaConf

    from vdm.diffusion import IdentityGuider, VanillaCFG
    from vdm.runs import read_run_config
    from vdm.sampling.load import CONF_DIR, make_multi_prompt_sampler, make_sampler

    config = read_run_config(run_dir)
    cfg = OmegaConf.load(CONF_DIR / "guider" / "cfg.yaml")
    config.guider = config.sampler_multi_prompt.guider = cfg  # a run trained with guider=cfg
    none = OmegaConf.load(CONF_DIR / "guider" / "none.yaml")
    dpmpp = OmegaConf.load(CONF_DIR / "sampler" / "dpmpp.yaml")
    plain, multi, scaled = (make_sampler(config, dpmpp, 4, guider=none, rescale="full"),
                            make_multi_prompt_sampler(config, 4, guider=none, rescale="full"),
                            make_multi_prompt_sampler(config, 4, cfg_scale=3.0))
    assert isinstance(plain.guider, IdentityGuider) and isinstance(multi.guider, IdentityGuider)
    assert plain.discretization.rescale == multi.discretization.rescale == "full"
    assert isinstance(scaled.guider, VanillaCFG) and scaled.guider.scale == 3.0
    assert scaled.discretization.rescale == "subset"  # the run's own
    config.guider = config.sampler_multi_prompt.guider = none  # the default run: unguided
    assert isinstance(make_multi_prompt_sampler(config, 4).guider, IdentityGuider)
    guided = make_multi_prompt_sampler(config, 4, cfg_scale=2.0)  # cfg=2: CFG at 2
    assert isinstance(guided.guider, VanillaCFG) and guided.guider.scale == 2.0


@pytest.mark.slow  # a compiled training run: ~45 s on 2 cores
def test_a_run_trained_compiled_samples_eagerly_unless_asked(tmp_path):
    """compile_model in a run's config sped up its training; sample.py's own compile_model decides."""
    from vdm.sampling.load import load_model

    run = trained_run(tmp_path, "compile_model=true", "max_steps=1")
    assert "compile_model: true" in (run / "config.yaml").read_text()
    eager = load_model(None, str(run), str(tmp_path / "runs"))
    assert not eager.engine.compile_model and eager.engine.network._compiled_call_impl is None
    compiled = load_model(None, str(run), str(tmp_path / "runs"), compile_model=True)
    assert compiled.engine.network._compiled_call_impl is not None
