"""vdm/config_schema.py: typed top-level keys of train.yaml and sample.yaml, refused before Hydra runs."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from vdm.build import CONF_DIR, compose
from vdm.config_schema import SCHEMAS, ConfigError, Scheduler, check_command_line, validate

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
GROUPS = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


def valid_keys(config_name: str) -> str:
    schema = {f.name for f in dataclasses.fields(SCHEMAS[config_name])}
    return ", ".join(sorted(set(compose([], config_name).keys()) | schema))


MAX_STEPZ = "unknown key 'max_stepz' in train.yaml; did you mean 'max_steps'? valid: {valid}"
RESUME = "in train.yaml; valid: auto, a run or checkpoint folder, null"


@pytest.mark.parametrize("config_name, argv, message", [
    ("train", ["max_stepz=5"], MAX_STEPZ),
    ("train", ["+max_stepz=5"], MAX_STEPZ),  # + bypasses Hydra's struct mode
    ("train", ["++max_stepz=5"], MAX_STEPZ),
    ("train", ["zzz=1"], "unknown key 'zzz' in train.yaml; valid: {valid}"),
    ("train", ["optim.lrr=1"], "unknown key 'optim.lrr' in train.yaml; did you mean 'optim.lr'? "
                               "valid under optim: _target_, betas, lr, weight_decay (+optim.lrr=1 adds a new key)"),
    ("train", ["+scheduler.decai=linear"], "unknown key 'scheduler.decai' in train.yaml; did you mean "
                                           "'scheduler.decay'? valid under scheduler: decay, min_lr_ratio, "
                                           "warmup_steps"),
    ("train", ["max_steps=abc"], "max_steps='abc' in train.yaml; valid: an integer"),
    ("train", ["batch_size=1.5"], "batch_size=1.5 in train.yaml; valid: an integer"),
    ("train", ["lora_train=1"], "lora_train=1 in train.yaml; valid: true, false"),
    ("train", ["mixed_precision=fp8"], "mixed_precision='fp8' in train.yaml; valid: no, bf16, fp16"),
    ("train", ["scheduler.decay=cos"], "scheduler.decay='cos' in train.yaml; valid: cosine, linear, "
                                       "constant"),
    ("train", ["resume="], "resume='' " + RESUME),
    ("train", ["resume=true"], "resume=true " + RESUME),
    ("train", ["log_keys=txt"], "log_keys='txt' in train.yaml; valid: a list of strings"),
    ("train", ["max_steps=${nope}"], "max_steps in train.yaml: Interpolation key 'nope' not found"),
    ("train", ["-m", "batch_size=2,1.5"], "batch_size=1.5 in train.yaml; valid: an integer"),  # each job
    ("sample", ["promts=x"], "unknown key 'promts' in sample.yaml; did you mean 'prompts'? valid: {valid}"),
    ("sample", ["control_options.end_stp=3"], "unknown key 'control_options.end_stp' in sample.yaml; did you mean "
                                      "'control_options.end_step'? valid under control_options: cur_token_idx, end_layer, end_step, "
                                      "frame_idx, layer_idx, out_dir, positions, ref_token_idx, save_masks_dir, "
                                      "share_kv_steps, start_layer, start_step, step_idx, thres, token_idx"),
    ("sample", ["control.end_step=3"], "control.end_step in sample.yaml: control_options.end_step is its name now "
                                       "(control= takes a value of its own)"),
    ("sample", ["control_options.thres=high"], "control_options.thres='high' in sample.yaml; valid: a number, null"),
    ("sample", ["dtype=fp64"], "dtype='fp64' in sample.yaml; valid: bf16, fp16, fp32, null"),
    ("sample", ["rescale=sub"], "rescale='sub' in sample.yaml; valid: subset, full, null"),
    ("sample", ["mode=edits"], "mode='edits' in sample.yaml; valid: sample, edit, reweight"),
    ("sample", ["device=gpu"], "device='gpu' in sample.yaml; valid: auto, cpu, cuda, cuda:<index>"),
    ("sample", ["prompts=7"], "prompts=7 in sample.yaml; valid: a string, a list of strings, null"),
    ("sample", ["steps=[1]"], "steps=[1] in sample.yaml; valid: an integer"),
])
def test_bad_key_or_value_is_one_line_naming_it(config_name, argv, message):
    with pytest.raises(ConfigError) as err:
        check_command_line(config_name, argv)
    assert str(err.value) == message.format(valid=valid_keys(config_name))


@pytest.mark.parametrize("config_name, argv", [
    ("train", []),
    ("train", ["max_steps=3", "batch_size=2", "mixed_precision=bf16", "clip_grad_norm=null", "run_name=7"]),
    ("train", ["resume=auto", "init_from=runs/base"]),
    ("train", ["experiment=cogvideox_2b_lora", "pretrained=/models/CogVideoX-2b", "data.root=/videos"]),
    ("train", ["network=cogvideox_2b", "network.num_layers=1", "+optim.foreach=true", "+network.extra=1"]),
    ("train", ["-m", "optim.lr=1e-3,3e-4", "max_steps=2", "network=dit,cogvideox_2b"]),
    ("train", ["hydra.run.dir=/tmp/elsewhere", "hydra.job.chdir=true", "hydra/job_logging=disabled"]),
    ("train", ["max_steps=${batch_size}", "~init_from"]),
    ("sample", ["prompts=[a, b]", "mode=edit", "dtype=null", "rescale=full", "device=cuda:1", "fps=7.5"]),
    ("sample", ["prompts=a panda", "sampler=ddim", "guider=cfg", "guider.scale=3", "control_options.end_step=3"]),
    ("sample", ["prompts=[]"]),  # types only: an empty prompt list is vdm.sampling's to refuse
])
def test_valid_command_lines_pass(config_name, argv):
    check_command_line(config_name, argv)


@pytest.mark.parametrize("argv", [["network=foo"], ["experiment=nope"], ["max_steps=[1,"], ["batch_size=1,2"],
                                  ["--help"], ["--version"], ["--config-name", "other", "max_stepz=1"]])
def test_what_the_check_does_not_know_is_left_to_hydra(argv):
    check_command_line("train", argv)  # Hydra reports these: option lists, syntax, -m for sweeps, flags


def test_an_unknown_group_option_keeps_hydras_message():
    with pytest.raises(MissingConfigException, match="Could not find 'network/foo'"):
        compose(["network=foo"], "train")


@pytest.mark.parametrize("config_name", ["train", "sample"])
def test_schema_types_exactly_the_yaml_keys(config_name):
    """A key added to the yaml is accepted at once but untyped: this asks for its line in the schema."""
    def compare(schema, defaults, where):
        typed = {f.name for f in dataclasses.fields(schema)}
        untyped = set(map(str, defaults.keys())) - typed
        assert not untyped, f"add `{sorted(untyped)[0]}: <type>` to {schema.__name__} (vdm/config_schema.py)"
        stale = typed - set(map(str, defaults.keys())) - (GROUPS if where == "" else set())
        assert not stale, f"{where}{sorted(stale)[0]} is typed in {schema.__name__}, not in {config_name}.yaml"
        for name, tp in get_type_hints(schema).items():
            if dataclasses.is_dataclass(tp):
                compare(tp, defaults[name], f"{where}{name}.")

    compare(SCHEMAS[config_name], compose([], config_name), "")


EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("overrides", [[], *[[f"experiment={name}"] for name in EXPERIMENTS]])
def test_every_experiment_validates(overrides):
    try:
        cfg = compose(overrides, "train")
    except ConfigCompositionException as err:  # a defaults-list problem of the yaml, not a key or a type
        pytest.xfail(f"Hydra cannot compose train.yaml with {overrides}: {err}")
    validate(cfg, "train")


def test_a_key_an_experiment_misspells_is_named():
    with pytest.raises(ConfigError, match=r"^unknown key 'max_step' in train.yaml; did you mean 'max_steps'"):
        validate(compose(["+max_step=3"], "train"), "train")


def test_choices_match_the_code():
    from vdm.diffusion.discretization import RESCALES
    from vdm.sampling.jobs import MODES
    from vdm.sampling.load import DTYPES
    from vdm.training.loop import HALF
    from vdm.training.schedule import DECAYS

    train, sample, scheduler = (get_type_hints(schema) for schema in (*SCHEMAS.values(), Scheduler))
    assert get_args(train["mixed_precision"]) == ("no", *HALF)
    assert get_args(scheduler["decay"]) == DECAYS
    assert get_args(sample["mode"]) == MODES
    assert get_args(get_args(sample["dtype"])[0]) == tuple(DTYPES)
    assert get_args(get_args(sample["rescale"])[0]) == RESCALES


def test_train_cli_refuses_before_any_folder_exists(tmp_path):
    for argv in (["+max_stepz=5"], ["-m", "batch_size=2,1.5"]):
        result = subprocess.run([sys.executable, "train.py", *argv, f"runs_root={tmp_path / 'runs'}"],
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(("error: " + MAX_STEPZ.format(valid="batch_size, "),
                                "error: batch_size=1.5 in train.yaml; valid: an integer"))
        assert not (tmp_path / "runs").exists()  # Hydra never made the run (or multirun) folder


def test_sample_cli_refuses_a_misspelt_key():
    result = subprocess.run([sys.executable, "sample.py", "promts=x"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown key 'promts' in sample.yaml; did you mean 'prompts'? valid: ad")
