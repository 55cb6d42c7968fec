"""Exact resume of what users run: `python train.py` as it is (the default synthetic network, batch 16, the
warm-up schedule, EMA, clipping, TensorBoard videos), in a process killed with SIGKILL mid-run and resumed with
`resume=auto`, against a run that went straight through; in float32 and under bf16 autocast (make train's
precision), and for a LoRA run on top. make train's compiled recipe is the slow test at the end.

The processes get the environment of a user's shell: no MKL_CBWR (vdm sets it itself, vdm/reproducible.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vdm import runs
from vdm.reproducible import MKL_CBWR, mkl_mode

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | {"PYTHONPATH": str(ROOT)}
# the default recipe, shortened: checkpoints every 4 steps, videos logged at step 6 (between two checkpoints)
SHORT = ["max_steps=12", "checkpoint.every=4", "checkpoint.keep=null", "video_every=6", "video_samples=2",
         "video_num_steps=4"]


def command(runs_root: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "train.py", f"runs_root={runs_root}", f"run_name={name}", *SHORT, *extra]


def train_straight(runs_root: Path, name: str, *extra: str) -> Path:
    result = subprocess.run(command(runs_root, name, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return runs_root / name


def train_killed_and_resumed(runs_root: Path, name: str, *extra: str) -> Path:
    """Start the run, SIGKILL it once its step-4 checkpoint exists (mid-run: it is training on), resume."""
    run_dir = runs_root / name
    job = subprocess.Popen(command(runs_root, name, *extra), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (run_dir / "checkpoints" / "step-4").is_dir():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.communicate(timeout=60)
    assert job.returncode == -signal.SIGKILL
    kept = [p.name for p in runs.list_checkpoints(run_dir)]
    assert "step-12" not in kept, f"the run finished before it was killed ({kept})"
    resumed = subprocess.run(command(runs_root, name, *extra, "resume=auto"), cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / kept[-1]}" in resumed.stderr + resumed.stdout
    return run_dir


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Weights, EMA, optimizer moments, schedule and progress equal to the bit."""
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not differ, f"{name}: {len(differ)} of {len(wa)} tensors differ, e.g. {differ[0]}"
    oa, ob = torch.load(a / "optimizer.pt", weights_only=True), torch.load(b / "optimizer.pt", weights_only=True)
    assert oa["state"].keys() == ob["state"].keys()
    for pid, slots in oa["state"].items():
        for key, value in slots.items():
            assert torch.equal(value, ob["state"][pid][key]), (pid, key)
    assert torch.load(a / "scheduler.pt", weights_only=True) == torch.load(b / "scheduler.pt", weights_only=True)
    assert runs.read_state(a) == runs.read_state(b)


@pytest.mark.parametrize("precision", ["no", pytest.param("bf16", marks=pytest.mark.slow)])  # bf16: 2 min where the CPU emulates it
def test_the_default_recipe_killed_mid_run_resumes_to_the_same_bits(tmp_path, precision):
    straight = train_straight(tmp_path, "straight", f"mixed_precision={precision}")
    killed = train_killed_and_resumed(tmp_path, "killed", f"mixed_precision={precision}")
    assert_same_checkpoint(straight / "checkpoints" / "step-12", killed / "checkpoints" / "step-12")
    if precision == "no":  # a LoRA run on the straight run's weights
        lora = ["lora_train=true", f"init_from={straight}"]
        assert_same_checkpoint(train_straight(tmp_path, "lora_straight", *lora) / "checkpoints" / "step-12",
                               train_killed_and_resumed(tmp_path, "lora_killed", *lora) / "checkpoints" / "step-12")


@pytest.mark.slow
def test_make_trains_compiled_recipe_killed_mid_run_resumes_to_the_same_bits(tmp_path):
    recipe = ["compile_model=true", "mixed_precision=bf16"]
    assert_same_checkpoint(train_straight(tmp_path, "straight", *recipe) / "checkpoints" / "step-12",
                           train_killed_and_resumed(tmp_path, "killed", *recipe) / "checkpoints" / "step-12")


@pytest.mark.skipif(mkl_mode() is None, reason="this torch is built without MKL")
def test_entry_points_and_tests_compute_with_mkl_pinned(tmp_path):
    assert os.environ["MKL_CBWR"] == MKL_CBWR and mkl_mode() == MKL_CBWR  # this test process (tests/conftest.py)
    # train.py started from a shell without MKL_CBWR: every GEMM MKL reports runs in the pinned mode
    result = subprocess.run(command(tmp_path, "verbose", "max_steps=1", "video_every=0", "batch_size=2"), cwd=ROOT,
                            env=ENV | {"MKL_VERBOSE": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    modes = {line.split("CNR:")[1].split()[0] for line in result.stdout.splitlines() if "CNR:" in line}
    assert modes == {MKL_CBWR}
