"""DiTCtrl case files as the reference writes them (`args:`), run unchanged by `sample.py pretrained=<dir>`:
multi-prompt, edit, reweight, single-prompt (repeated), isolated runs, mask-guided masks and attention maps.

The folder is a tiny CogVideoX-2b-like model with the real frame count (49 frames -> 13 latent frames), so
the reference's layout (overlap 9, 2 transition blocks) and window (steps 2..25) apply as they are.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cogvideox_folder import VARIANTS, make_cogvideox_folder
from vdm.build import compose
from vdm.data.video_io import read_mp4
from vdm.diffusion.multi_prompt import plan_segments, segment_starts
from vdm.sampling import load_model, make_sampler, sample

ROOT = Path(__file__).resolve().parents[2]
STEPS = "steps=26"
P = ["a red square moving right", "a blue circle moving up", "a green triangle drifting down"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    transformer = dict(VARIANTS["2b"]["transformer"], sample_frames=49)
    return make_cogvideox_folder(tmp_path_factory.mktemp("cases") / "CogVideoX-2b", "2b", transformer=transformer)


def case(path: Path, **args) -> Path:
    path.write_text(json.dumps({"args": args}))  # JSON is YAML
    return path


def run(folder: Path, case_file: Path, *overrides: str, explicit=()) -> list[dict]:
    cfg = compose([f"pretrained={folder}", f"prompts_file={case_file}", "sampler.verbose=false", *overrides],
                  config_name="sample")
    out = sample(cfg, frozenset(explicit) | {o.split("=")[0].lstrip("+") for o in overrides})
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_multi_prompt_case_with_the_reference_defaults(folder, tmp_path):
    out = tmp_path / "athlete"
    rows = run(folder, case(tmp_path / "athlete.yaml", overlap_size=6, num_transition_blocks=1, seed=42,
                            output_dir=str(out), prompts=P, load="CogVideoX-2b-sat/transformer", fp16=True,
                            batch_size=1, latent_channels=16, mode="inference", force_inference=True), STEPS)
    (row,) = rows
    assert (row["seed"], row["control"], row["fps"]) == (42, "kv_sharing", 16)  # inference.yaml: KV-sharing, 16 fps
    assert row["layout"] == {"tile_size": 13, "overlap_size": 6, "num_transition_blocks": 1, "longer_mid_segment": 0,
                             "segments": 5, "reuse": True}
    assert row["frames"] == 13 + 4 * 7 and read_mp4(out / row["file"]).shape[0] == 4 * (row["frames"] - 1) + 1
    # no window in the file: the reference's steps 2..25 of 50 at 26 steps, and the last layers
    assert row["control_options"] == {"start_step": 1, "end_step": 13}


def test_command_line_wins_over_the_file_and_the_file_over_the_defaults(folder, tmp_path):
    file = case(tmp_path / "c.yaml", prompts=P[:2], seed=5, sampling_fps=12, output_dir=str(tmp_path / "out"))
    rows = run(folder, file, STEPS, "seed=7", "num_transition_blocks=0")
    assert rows[0]["seed"] == 7 and rows[0]["fps"] == 12  # seed: command line; fps: the file
    assert rows[0]["layout"]["overlap_size"] == 9 and rows[0]["layout"]["num_transition_blocks"] == 0


def test_edit_and_reweight_cases(folder, tmp_path):
    edit = run(folder, case(tmp_path / "edit.yaml", seed=42, sampling_fps=8, is_edit=True, prompts=P[:2],
                            output_dir=str(tmp_path / "edit")), STEPS)
    assert [(r["role"], r["control"], r["fps"]) for r in edit] == [("source", "kv_sharing", 8), ("target", "kv_sharing", 8)]
    reweight = run(folder, case(tmp_path / "rw.yaml", seed=42, sampling_fps=8, reweight_token_idx=2, reweight_scale=0.5,
                                start_step=0, end_step=4, start_layer=0, end_layer=2,
                                adaln_mixin_names=["ReWeightAdaLNMixin"], prompts=[P[0], P[0]],
                                output_dir=str(tmp_path / "rw")), "steps=4")
    assert [r["control"] for r in reweight] == ["reweight", "reweight"]
    assert reweight[0]["control_options"]["reweight_scale"] == 0.5


def test_reweight_mode_defaults_to_every_step_and_layer(folder, tmp_path):
    from vdm.sampling.jobs import control_options

    cfg = compose(["mode=reweight", "reweight_token_idx=1", "steps=50"], config_name="sample")
    assert control_options(cfg, "reweight", 50) == {"reweight_token_idx": 1, "reweight_scale": 2.0,
                                                    "start_step": 0, "end_step": 50, "start_layer": 0}


def test_single_prompt_length_repeats_the_prompt(folder, tmp_path):
    rows = run(folder, case(tmp_path / "fish.yaml", seed=42, single_prompt_length=3, prompts=[P[2]],
                            output_dir=str(tmp_path / "fish")), STEPS)
    (row,) = rows
    assert row["prompts"] == [P[2]] * 3 and row["layout"]["segments"] == 3 + 2 * 2


def test_isolated_runs_sample_each_prompt_from_its_segment_noise(folder, tmp_path):
    out = tmp_path / "iso"
    rows = run(folder, case(tmp_path / "iso.yaml", seed=3, is_run_isolated=True, prompts=P[:2], overlap_size=6,
                            num_transition_blocks=1, output_dir=str(out)), "steps=3", "adaln=[base]",
               "save_latents=true")
    roles = [r.get("role") for r in rows]
    assert roles == [None, "isolated", "isolated", "isolated_all"]
    # the oracle: prompt i alone, from the noise of its first segment of the long latent
    loaded = load_model(str(folder), None, "runs")
    engine = loaded.engine
    sampler = make_sampler(loaded.config, compose(["sampler.verbose=false"], config_name="sample").sampler, 3)
    plan = plan_segments(2, 1)
    starts = segment_starts(len(plan), 13, 6)
    randn = torch.randn((1, rows[0]["frames"], 4, 6, 8), generator=torch.Generator().manual_seed(3))
    for i, k in enumerate((0, 2)):
        cond, uc = engine.conditioning({"txt": [P[i]]})
        expected = engine.sample_single(cond, uc, randn[:, starts[k]:starts[k] + 13], sampler=sampler,
                                        generator=torch.Generator().manual_seed(3))
        got = load_file(out / rows[1 + i]["latent"])["latent"]
        torch.testing.assert_close(got, expected[0], rtol=0, atol=1e-5)
    assert read_mp4(out / rows[3]["file"]).shape[0] == 2 * 49


def test_mask_guided_case_writes_continuous_masks(folder, tmp_path):
    out = tmp_path / "mask"
    run(folder, case(tmp_path / "mask.yaml", seed=42, prompts=P[:2], adaln_mixin_names=["KVSharingMaskGuidedAdaLNMixin"],
                     ref_token_idx=[2], cur_token_idx=[2], thres=0.3, mask_save_dir=str(tmp_path / "masks"),
                     output_dir=str(out), num_transition_blocks=0, start_step=1, end_step=2), "steps=3")
    pngs = sorted((tmp_path / "masks" / "sample_0000").rglob("*.png"))
    assert pngs, "mask PNGs were not written"


def test_visualisation_case_on_a_single_prompt_writes_attention_maps(folder, tmp_path):
    out = tmp_path / "vis"
    rows = run(folder, case(tmp_path / "vis.yaml", seed=42, sampling_fps=8, adaln_mixin_names=["VisualizeAdaLNMixin"],
                            prompts=[P[0]], output_dir=str(out), attn_map_step_idx=[1], attn_map_layer_idx=[0, 1]),
               "steps=3")
    assert rows[0]["control"] == "visualize" and rows[0]["fps"] == 8
    assert sorted((out / "attn_map" / "sample_0000").rglob("*.png")), "attention maps were not written"


def test_bad_case_files_are_one_line_errors_and_write_nothing(folder, tmp_path):
    """The first through the CLI (exit 2, one `error:` line), the others in-process (the same error, raised)."""
    from vdm.errors import UserError

    out = tmp_path / "out"
    for i, (args, message) in enumerate([
        (dict(prompts=P[:2], output_dir=str(out), overlap=3), "overlap"),
        (dict(output_dir=str(out)), "prompts"),
        (dict(prompts=P[:2], output_dir=str(out), adaln_mixin_names=["FancyAdaLNMixin"]), "FancyAdaLNMixin"),
        (dict(prompts=P[:2], output_dir=str(out), ref_token_idx=[40], cur_token_idx=[1],
              adaln_mixin_names=["KVSharingMaskGuidedAdaLNMixin"]), "ref_token_idx"),
        (dict(prompts=P[:2], output_dir=str(out), end_layer=31), "end_layer=31"),
        (dict(prompts=P[:2], output_dir=str(out), end_step=25), "end_step=25 is outside the sampler's 4 steps"),
    ]):
        file = case(tmp_path / "bad.yaml", **args)
        steps = ["steps=4"] if "end_step" in message else [STEPS]
        if i == 0:
            result = subprocess.run([sys.executable, "sample.py", f"pretrained={folder}", f"prompts_file={file}", *steps],
                                    cwd=ROOT, capture_output=True, text=True, timeout=300)
            errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            assert result.returncode == 2 and len(errors) == 1 and message in errors[0], (message, result.stderr[-800:])
        else:
            with pytest.raises(UserError) as raised:
                run(folder, file, *steps)
            assert message in str(raised.value) and "\n" not in str(raised.value), (message, raised.value)
        assert not out.exists()
