"""Reference (DiTCtrl) case files as sampling options: every key mapped onto sample.yaml's names, the
precedence command line > file > the reference's defaults > sample.yaml, and one-line refusals."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vdm.build import compose
from vdm.networks.controls import CONTROLS
from vdm.sampling.case_file import (
    ADALN,
    CaseFile,
    apply_case_file,
    explicit_keys,
    is_case_file,
    read_case_file,
)
from vdm.sampling.jobs import given_control_options

CASES = Path(__file__).resolve().parent / "cases"
LIGHTHOUSE = ["A lighthouse on a rocky cape at dawn, waves breaking gently below.",
              "A lighthouse on a rocky cape at noon, gulls circling the lantern.",
              "A lighthouse on a rocky cape at night, its beam sweeping the fog."]
KITE = ["a red kite flying over a green hill", "a blue kite flying over a green hill"]


@pytest.fixture(scope="module")
def defaults():
    return compose([], config_name="sample")


def write(tmp_path: Path, text: str, name: str = "case.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_multi_prompt_case():
    case = read_case_file(CASES / "multi_prompt.yaml")
    assert case.options == {
        "seed": 7, "output_dir": "outputs/multi_prompt_case/lighthouse", "tile_size": 13, "overlap_size": 6,
        "num_transition_blocks": 1, "longer_mid_segment": 1, "is_run_isolated": True, "prompts": LIGHTHOUSE}
    assert case.inherited == {"fps": 16, "control": ["kv_sharing"]}  # the reference's configs/inference.yaml
    assert case.ignored == ()


def test_edit_case():
    case = read_case_file(CASES / "edit.yaml")
    assert case.options == {"seed": 11, "output_dir": "outputs/edit_case/red_blue_kite", "fps": 8,
                            "mode": "edit", "prompts": KITE}
    assert case.inherited == {"control": ["kv_sharing"]}  # the reference edits with KV-sharing; no layout


def test_reweight_case_is_reweight_mode_with_a_full_window():
    case = read_case_file(CASES / "reweight.yaml")
    assert case.options == {
        "seed": 5, "output_dir": "outputs/reweight_case/kite_half", "fps": 8, "reweight_token_idx": 2,
        "reweight_scale": 0.5, "control_options.start_step": 0, "control_options.end_step": 50, "control_options.start_layer": 0,
        "control_options.end_layer": 30, "control": ["reweight"], "mode": "reweight", "prompts": [KITE[0], KITE[0]]}
    assert case.inherited == {}


def test_single_prompt_case():
    case = read_case_file(CASES / "single_prompt.yaml")
    assert case.options["single_prompt_length"] == 4
    assert len(case.options["prompts"]) == 1
    assert "mode" not in case.options
    # four segments of one prompt are a multi-prompt video: the reference's layout applies
    assert case.inherited == {"fps": 16, "control": ["kv_sharing"], "overlap_size": 9, "num_transition_blocks": 2,
                              "longer_mid_segment": 0}


def test_visualize_case():
    case = read_case_file(CASES / "visualize.yaml")
    assert case.options == {"seed": 9, "output_dir": "outputs/visualization/owl", "control": ["visualize"], "fps": 8,
                            "attn_map_step_idx": [10, 30], "attn_map_layer_idx": [5, 20, 29],
                            "prompts": ["an owl perched on a branch beside a full moon"]}
    assert case.inherited == {}


def test_mask_guided_case():
    case = read_case_file(CASES / "mask_guided.yaml")
    assert case.options == {
        "control": ["kv_sharing_mask_guided"], "seed": 21, "output_dir": "outputs/multi_prompt_case/white_cat",
        "control_options.thres": 0.25, "control_options.ref_token_idx": [1, 2], "control_options.cur_token_idx": [1, 2],
        "control_options.step_idx": [2, 4, 6], "control_options.layer_idx": [26, 28],
        "control_options.save_masks_dir": "outputs/multi_prompt_case/white_cat/masks",
        "prompts": ["A white cat sleeps on a sunny windowsill.", "A white cat chases a ball of yarn across the rug."]}
    assert case.inherited == {"fps": 16, "overlap_size": 9, "num_transition_blocks": 2, "longer_mid_segment": 0}


def test_mask_guided_case_inherits_the_reference_threshold_and_tokens(tmp_path):
    path = write(tmp_path, "args:\n  adaln_mixin_names: ['KVSharingMaskGuidedAdaLNMixin']\n"
                           "  ref_token_idx: [1]\n  prompts: ['a fox in snow', 'a fox in rain']\n")
    inherited = read_case_file(path).inherited
    assert inherited["control_options.thres"] == 0.3 and inherited["control_options.cur_token_idx"] == [0]
    assert "control_options.ref_token_idx" not in inherited  # the file states it


def test_runtime_keys_are_ignored_and_reported():
    case = read_case_file(CASES / "runtime_keys.yaml")
    assert case.options == {"seed": 1, "prompts": ["a paper boat drifting down a rainy street"]}
    assert case.ignored == ("latent_channels", "mode", "load", "batch_size", "fp16", "force_inference")


def test_flat_file_reads_the_same_keys_without_reference_defaults():
    case = read_case_file(CASES / "flat.yaml")
    assert case.options == {"seed": 13, "overlap_size": 4, "prompts": [
        "a hot air balloon rising over a misty valley", "a hot air balloon drifting above the clouds"]}
    assert case.inherited == {}  # not the reference's form: sample.yaml's defaults stand


def test_prompts_only_yaml_is_a_flat_case_file(tmp_path):
    case = read_case_file(write(tmp_path, "prompts:\n  - ' a cat '\n  - a dog\n"))
    assert case.options == {"prompts": ["a cat", "a dog"]} and case.inherited == {} and case.ignored == ()


def test_every_reference_key_is_read():
    case = read_case_file(CASES / "every_key.yaml")
    assert case.options == {
        "tile_size": 13, "fps": 12, "is_run_isolated": False, "seed": 100, "output_dir": "outputs/every_key",
        "control": ["kv_sharing", "kv_sharing_mask_guided"], "control_options.start_step": 3, "control_options.end_step": 20,
        "control_options.start_layer": 24, "control_options.end_layer": 30, "control_options.thres": 0.2, "attn_map_step_idx": [5, 15],
        "attn_map_layer_idx": [10], "overlap_size": 9, "num_transition_blocks": 2, "longer_mid_segment": 0,
        "control_options.ref_token_idx": [0], "control_options.cur_token_idx": 0, "single_prompt_length": 0,
        "reweight_token_idx": [1, 3], "reweight_scale": 2.0,
        "prompts": ["a sailboat on a calm lake in the morning", "a sailboat on a stormy lake at dusk"]}
    # null step_idx / layer_idx and an empty mask_save_dir state nothing; is_edit: false sets no mode
    assert not {"control_options.step_idx", "control_options.layer_idx", "control_options.save_masks_dir", "mode"} & set(case.options)
    assert len(case.ignored) == 6 and case.inherited == {}


def test_adaln_names_are_vdm_controls():
    assert set(ADALN.values()) <= set(CONTROLS)


def test_vdm_control_names_are_accepted(tmp_path):
    case = read_case_file(write(tmp_path, "args:\n  adaln_mixin_names: [kv_sharing, BaseAdaLNMixin]\n"
                                          "  prompts: [a, b]\n"))
    assert case.options["control"] == ["kv_sharing", "base"]


def test_is_case_file():
    assert is_case_file("case.yaml") and is_case_file(Path("dir/case.YML"))
    assert not is_case_file("prompts.txt") and not is_case_file("yaml")


def test_explicit_keys_from_hydra_overrides():
    assert explicit_keys(["seed=1", "+control_options.thres=0.2", "++fps=4", "~output_dir", "sampler=ddim"]) == {
        "seed", "control_options.thres", "fps", "output_dir", "sampler"}


def test_file_overrides_defaults_and_adds_missing_keys(defaults):
    out = apply_case_file(defaults, read_case_file(CASES / "multi_prompt.yaml"))
    assert out.seed == 7 and out.overlap_size == 6 and out.tile_size == 13 and list(out.prompts) == LIGHTHOUSE
    assert out.fps == 16 and list(out.control) == ["kv_sharing"]  # inherited over sample.yaml's null / [base]
    assert out.is_run_isolated is True  # added even where sample.yaml does not have the key yet
    assert out.steps == defaults.steps and out.mode == "sample"  # what the file leaves alone
    assert OmegaConf.is_struct(out)


def test_control_options_land_under_control(defaults):
    out = apply_case_file(defaults, read_case_file(CASES / "mask_guided.yaml"))
    assert given_control_options(out) == {
        "thres": 0.25, "ref_token_idx": [1, 2], "cur_token_idx": [1, 2], "step_idx": [2, 4, 6],
        "layer_idx": [26, 28], "save_masks_dir": "outputs/multi_prompt_case/white_cat/masks"}


def test_command_line_overrides_file(defaults):
    cfg = compose(["seed=123", "fps=30", "control_options.thres=0.5"], config_name="sample")
    out = apply_case_file(cfg, read_case_file(CASES / "mask_guided.yaml"), {"seed", "fps", "control_options.thres"})
    assert out.seed == 123 and out.fps == 30 and out.control_options.thres == 0.5
    assert list(out.control_options.ref_token_idx) == [1, 2] and out.output_dir.endswith("white_cat")


def test_explicit_parent_key_covers_its_children(defaults):
    out = apply_case_file(defaults, read_case_file(CASES / "reweight.yaml"), {"control_options"})
    assert given_control_options(out) == {} and out.mode == "reweight"


def test_apply_does_not_change_the_input(defaults):
    before = OmegaConf.to_container(defaults)
    apply_case_file(defaults, read_case_file(CASES / "every_key.yaml"))
    assert OmegaConf.to_container(defaults) == before


def test_visualize_keys_added_to_sample_config(defaults):
    out = apply_case_file(defaults, read_case_file(CASES / "visualize.yaml"))
    assert list(out.attn_map_step_idx) == [10, 30] and list(out.attn_map_layer_idx) == [5, 20, 29]
    assert list(out.control) == ["visualize"]


def test_single_prompt_length_added_to_sample_config(defaults):
    out = apply_case_file(defaults, read_case_file(CASES / "single_prompt.yaml"))
    assert out.single_prompt_length == 4 and out.num_transition_blocks == 2


def test_case_file_is_frozen():
    case = read_case_file(CASES / "edit.yaml")
    assert isinstance(case, CaseFile)
    with pytest.raises(AttributeError):
        case.options = {}


REFUSALS = {
    "no_prompts": ("args:\n  seed: 1\n", r"has no prompts; give args\.prompts"),
    "null_prompts": ("args:\n  prompts: null\n", r"has no prompts"),
    "empty_file": ("", r"has no prompts; give prompts"),
    "empty_prompts": ("args:\n  prompts: []\n", r"args\.prompts=\[\]; valid: a non-empty list"),
    "prompts_a_string": ("args:\n  prompts: a cat\n", r"args\.prompts='a cat'; valid: a non-empty list of non-empty"),
    "blank_prompt": ("args:\n  prompts: ['a cat', '  ']\n", r"args\.prompts=.*valid: a non-empty list"),
    "unknown_key": ("args:\n  prompts: [a]\n  sampling_steps: 20\n",
                    r"unknown key args\.sampling_steps; valid keys: prompts, seed, .*latent_channels"),
    "unknown_flat_key": ("prompts: [a]\nguidance: 6\n", r"unknown key guidance; valid keys"),
    "key_beside_args": ("args:\n  prompts: [a]\nmodel: {}\n", r"top-level key 'model' beside `args:`"),
    "args_not_mapping": ("args: [a]\n", r"`args:` must be a mapping"),
    "not_mapping": ("- a\n- b\n", r"must hold a mapping"),
    "bad_yaml": ("args:\n  prompts: [a\n", r"is not readable YAML: .*line"),
    "unknown_adaln": ("args:\n  adaln_mixin_names: ['KVSharingAdaLNMixin', 'CrossFrameMixin']\n  prompts: [a]\n",
                      r"args\.adaln_mixin_names=.*BaseAdaLNMixin, KVSharingAdaLNMixin.*'CrossFrameMixin' is unknown"),
    "adaln_not_names": ("args:\n  adaln_mixin_names: [1]\n  prompts: [a]\n", r"args\.adaln_mixin_names=\[1\]"),
    "reweight_mixed": ("args:\n  adaln_mixin_names: [ReWeightAdaLNMixin, KVSharingAdaLNMixin]\n  prompts: [a, a]\n",
                       r"mixes ReWeightAdaLNMixin with other controls"),
    "seed_string": ("args:\n  seed: '42'\n  prompts: [a]\n", r"args\.seed='42'; valid: an integer$"),
    "seed_float": ("args:\n  seed: 4.2\n  prompts: [a]\n", r"args\.seed=4\.2; valid: an integer"),
    "seed_bool": ("args:\n  seed: true\n  prompts: [a]\n", r"args\.seed=True; valid: an integer"),
    "fps_zero": ("args:\n  sampling_fps: 0\n  prompts: [a]\n", r"args\.sampling_fps=0; valid: an integer >= 1"),
    "overlap_negative": ("args:\n  overlap_size: -1\n  prompts: [a]\n", r"args\.overlap_size=-1; valid: an integer >= 0"),
    "is_edit_string": ("args:\n  is_edit: 'yes'\n  prompts: [a, b]\n", r"args\.is_edit='yes'; valid: true or false"),
    "is_edit_int": ("args:\n  is_edit: 1\n  prompts: [a, b]\n", r"args\.is_edit=1; valid: true or false"),
    "isolated_string": ("args:\n  is_run_isolated: 'False'\n  prompts: [a]\n", r"args\.is_run_isolated='False'"),
    "ref_token_float": ("args:\n  ref_token_idx: 1.5\n  prompts: [a]\n",
                        r"args\.ref_token_idx=1\.5; valid: a text token index or a non-empty list"),
    "cur_token_strings": ("args:\n  cur_token_idx: ['1']\n  prompts: [a]\n", r"args\.cur_token_idx=\['1'\]"),
    "token_empty": ("args:\n  reweight_token_idx: []\n  prompts: [a]\n", r"args\.reweight_token_idx=\[\]"),
    "token_negative": ("args:\n  ref_token_idx: [-1]\n  prompts: [a]\n", r"args\.ref_token_idx=\[-1\]"),
    "step_idx_strings": ("args:\n  step_idx: [a]\n  prompts: [a]\n", r"args\.step_idx=\['a'\]; valid: a list of integers"),
    "thres_string": ("args:\n  thres: high\n  prompts: [a]\n", r"args\.thres='high'; valid: a number"),
    "scale_bool": ("args:\n  reweight_scale: false\n  prompts: [a]\n", r"args\.reweight_scale=False; valid: a number"),
    "mask_dir_number": ("args:\n  mask_save_dir: 3\n  prompts: [a]\n", r"args\.mask_save_dir=3; valid: a folder path"),
    "output_dir_empty": ("args:\n  output_dir: ''\n  prompts: [a]\n", r"args\.output_dir=''; valid: a non-empty string"),
    "single_length_two_prompts": ("args:\n  single_prompt_length: 3\n  prompts: [a, b]\n",
                                  r"single_prompt_length repeats one prompt; the file gives 2"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_are_one_line_naming_file_and_key(tmp_path, name):
    text, message = REFUSALS[name]
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as err:
        read_case_file(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"case file .*nope\.yaml: no such file"):
        read_case_file(tmp_path / "nope.yaml")
