"""Progressive distillation runs (use_pd=true): a round lowers the student-vs-two-teacher-steps loss, round
checkpoints sample at their step count without guidance, LoRA students train adapters on the frozen teacher,
resuming mid-round is exact, and bad options are one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import default_collate

from tests.conftest import TINY_NETWORK
from vdm import runs
from vdm.build import compose
from vdm.data.synthetic import SyntheticWorld
from vdm.diffusion import VanillaCFG
from vdm.diffusion.distill import ProgressiveDistillationLoss
from vdm.sampling import load_run
from vdm.sampling import sample as sample_videos
from vdm.training.loop import train

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
PROMPT = "a red square moving right"


def config(root: Path, name: str, *overrides: str):
    return compose(TINY_NETWORK + ["denoiser=video_v", f"runs_root={root}", f"run_name={name}", "batch_size=2",
                                   "log_every=1", "video_every=0", "scheduler.warmup_steps=1", "sampler.verbose=false",
                                   *overrides], config_name="train")


def run(root: Path, name: str, *overrides: str) -> Path:
    train(config(root, name, *overrides), root / name)
    return root / name


def distil(root: Path, name: str, teacher: Path, *overrides: str) -> Path:
    return run(root, name, "use_pd=true", f"init_from={teacher}", "checkpoint.keep=null", "pd.scheduler.warmup_steps=1",
               *overrides)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pd")
    return run(root, "teacher", "max_steps=2")


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}"


def test_one_round_reduces_the_student_vs_two_teacher_steps_loss(teacher, tmp_path):
    pd = distil(tmp_path, "pd", teacher, "pd.teacher_steps=4", "pd.student_steps=2", "pd.steps_per_round=30",
                "pd.lr=3e-3", "batch_size=4", "data.length=8")
    # the first teacher is the teacher run's EMA weights, recorded in the run folder (a LoRA student's base)
    recorded = Path(runs.read_run_config(pd).init_from)
    assert recorded == (pd / "teacher.safetensors").resolve()
    ema = load_file(checkpoint(teacher, 2) / "ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in load_file(recorded).items())

    guided_teacher = load_run(checkpoint(teacher, 2)).engine  # EMA weights, as distilled
    loss = ProgressiveDistillationLoss(guided_teacher.model, VanillaCFG(1.5), guided_teacher.sampler_ddim, 2,
                                       uc_keys=guided_teacher.unconditional_keys())
    world = SyntheticWorld(length=8, seed=0)
    batch = default_collate([world[i] for i in range(8)])

    def value(engine) -> float:  # the same steps and noise for both
        torch.manual_seed(1)
        x, b = engine.prepare_batch(batch)
        with torch.no_grad():
            return float(torch.stack([loss(engine.model, engine.denoiser, engine.conditioner, x, b).mean()
                                      for _ in range(4)]).mean())

    before = value(guided_teacher)  # the student starts as the teacher
    after = value(load_run(checkpoint(pd, 30), use_ema=False).engine)
    assert before > 0.01 and after < 0.85 * before, (before, after)


def test_round_checkpoints_sample_with_ddim_at_their_steps_and_no_guidance(teacher, tmp_path):
    # the synthetic world samples unguided; guider=cfg distils CFG at its scale, 1.5
    pd = distil(tmp_path, "pd", teacher, "pd.teacher_steps=8", "pd.student_steps=2", "pd.steps_per_round=2",
                "guider=cfg")
    record = runs.read_distillation(checkpoint(pd, 2))
    assert (record["round"], record["student_steps"], record["guidance"], record["distilled_guidance_scale"]) == \
        (1, 4, "distilled", 1.5)
    assert runs.read_distillation(checkpoint(pd, 4))["student_steps"] == 2

    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "sample.py", f"checkpoint={checkpoint(pd, 2)}", f"prompts=[{PROMPT}]",
                           f"output_dir={out}", "sampler.verbose=false"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert (row["sampler"], row["steps"], row["guider"], row["cfg"]) == ("VideoDDIMSampler", 4, "IdentityGuider", None)

    def sampled(checkpoint_dir: Path, name: str, *overrides: str, explicit=frozenset()) -> dict:
        cfg = compose([f"checkpoint={checkpoint_dir}", f"prompts=[{PROMPT}]", f"output_dir={tmp_path / name}",
                       *overrides], config_name="sample")
        out = sample_videos(cfg, explicit)
        return json.loads((out / "samples.jsonl").read_text().splitlines()[0])

    row = sampled(checkpoint(pd, 4), "last")
    assert (row["sampler"], row["steps"], row["guider"]) == ("VideoDDIMSampler", 2, "IdentityGuider")
    # what the command line states wins
    row = sampled(checkpoint(pd, 4), "dpmpp", "sampler=dpmpp", "steps=3", explicit=frozenset({"sampler", "steps"}))
    assert (row["sampler"], row["steps"], row["guider"]) == ("VPSDEDPMPP2MSampler", 3, "IdentityGuider")


def test_lora_students_train_adapters_on_the_frozen_teacher(teacher, tmp_path):
    pd = distil(tmp_path, "lora", teacher, "lora_train=true", "lora.rank=2", "pd.teacher_steps=4",
                "pd.student_steps=1", "pd.steps_per_round=2", "pd.lr=1e-2")
    for step in (2, 4):
        saved = load_file(checkpoint(pd, step) / "model.safetensors")
        assert saved and all("lora_" in k for k in saved)
        assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in saved.items())
    engine = load_run(checkpoint(pd, 4)).engine  # base: the teacher's EMA weights, recorded by the run
    state = engine.network.state_dict()
    for k, v in load_file(checkpoint(teacher, 2) / "ema.safetensors").items():
        if not k.startswith("__"):
            key = k if k in state else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            assert torch.equal(state[key], v), k
    out = sample_videos(compose([f"checkpoint={checkpoint(pd, 4)}", f"prompts=[{PROMPT}]",
                                 f"output_dir={tmp_path / 'out'}"], config_name="sample"))
    row = json.loads((out / "samples.jsonl").read_text())
    assert (row["sampler"], row["steps"], row["guider"]) == ("VideoDDIMSampler", 1, "IdentityGuider")


@pytest.mark.parametrize("lora", [False, True])
def test_resume_mid_round_is_exact(teacher, tmp_path, lora):
    options = ["pd.teacher_steps=4", "pd.student_steps=1", "pd.steps_per_round=4", "checkpoint.every=2",
               *(["lora_train=true", "lora.rank=2", "pd.lr=1e-2"] if lora else [])]
    straight = distil(tmp_path, "straight", teacher, *options)
    interrupted = distil(tmp_path, "interrupted", teacher, *options)
    for resume_at in (2, 6):  # mid first round (its teacher: init_from), then mid second (its teacher: step-4)
        for step in range(resume_at + 2, 9, 2):
            shutil.rmtree(checkpoint(interrupted, step))
        distil(tmp_path, "interrupted", teacher, *options, "resume=auto")
        for step in (4, 6, 8):
            a, b = checkpoint(straight, step), checkpoint(interrupted, step)
            for name in ("model.safetensors", "ema.safetensors"):
                wa, wb = load_file(a / name), load_file(b / name)
                assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (step, name)
            oa, ob = torch.load(a / "optimizer.pt"), torch.load(b / "optimizer.pt")
            assert all(torch.equal(v, ob["state"][p][k]) for p, s in oa["state"].items() for k, v in s.items())
            assert {**runs.read_distillation(a), "first_teacher": None} == {**runs.read_distillation(b), "first_teacher": None}
            assert runs.read_state(a) == runs.read_state(b)
    with pytest.raises(ValueError, match="the checkpoint was distilled with pd.teacher_steps=4, pd.student_steps=1, "
                                         "pd.steps_per_round=4; resume it with the same pd options"):
        distil(tmp_path, "other", teacher, *options, "pd.steps_per_round=3", f"resume={checkpoint(straight, 6)}")


@pytest.mark.parametrize("overrides, message", [
    (["use_pd=true"], r"use_pd=true needs a teacher: init_from=<teacher run, checkpoint or \.safetensors file> "
                      r"\(or pretrained=<CogVideoX folder>\)"),
    (["use_pd=true", "init_from=T", "pd.teacher_steps=64", "pd.student_steps=3"],
     "pd.student_steps=3 must divide pd.teacher_steps=64 by a power of two; valid: 32, 16, 8, 4, 2, 1"),
    (["use_pd=true", "init_from=T", "pd.teacher_steps=12", "pd.student_steps=12"],
     "pd.student_steps=12 must divide pd.teacher_steps=12 by a power of two; valid: 6, 3"),
    (["pd.student_steps=4"], "pd.student_steps=4 is set but use_pd=false: pd options configure progressive "
                             "distillation; add use_pd=true init_from=<teacher> or drop them"),
    (["use_pd=true", "init_from=T", "guider=none", "pd.guidance_scale=3"],
     r"pd.guidance_scale=3 but the guider \(vdm.diffusion.IdentityGuider\) has no scale"),
    (["use_pd=true", "init_from=T", "fsdp=true"], "use_pd=true does not support fsdp=true"),
])
def test_bad_options_are_refused_before_anything_is_written(teacher, tmp_path, overrides, message):
    overrides = [o.replace("=T", f"={teacher}") for o in overrides]
    with pytest.raises(ValueError, match=message):
        run(tmp_path, "bad", *overrides)
    assert not (tmp_path / "bad" / "config.yaml").exists()


def test_a_teacherless_cli_run_exits_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "train.py", "use_pd=true", f"runs_root={tmp_path}", "pd.student_steps=4"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: use_pd=true needs a teacher: init_from=<teacher run, checkpoint or .safetensors file> "
        "(or pretrained=<CogVideoX folder>)"]
