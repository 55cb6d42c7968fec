"""Data-parallel training on CPU (gloo) and Hydra multirun, as separate processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_two_process_data_parallel_keeps_ranks_identical(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29533",
                             str(ROOT / "tests" / "training" / "ddp_worker.py"), str(tmp_path)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    r0, r1 = load_file(run_dir / "rank-0.safetensors"), load_file(run_dir / "rank-1.safetensors")
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    saved = load_file(run_dir / "checkpoints" / "step-3" / "model.safetensors")
    assert all(torch.equal(saved[k], r0[k]) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "norm1.linear" in k)  # it trained
    assert (run_dir / "checkpoints" / "step-3" / "rng-1.pt").is_file()
    state = (run_dir / "checkpoints" / "step-3" / "state.json").read_text()
    assert '"data_position": 12' in state and '"world_size": 2' in state  # 3 steps x 2 ranks x batch 2


def test_multirun_makes_one_run_per_value(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "-m", "optim.lr=1e-3,3e-4", "max_steps=2", "batch_size=2",
                             f"runs_root={tmp_path}", "video_every=0", "network.num_layers=1",
                             "network.num_attention_heads=2", "network.attention_head_dim=16",
                             "network.time_embed_dim=32"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent for p in tmp_path.glob("multirun/*/*/config.yaml"))
    assert [p.name for p in runs] == ["0", "1"]
    lrs = [float(next(line for line in (run / "config.yaml").read_text().splitlines()
                      if line.strip().startswith("lr:")).split(":")[1]) for run in runs]
    assert lrs == [1e-3, 3e-4]
    assert all((run / "checkpoints" / "step-2" / "model.safetensors").is_file() for run in runs)


@pytest.mark.parametrize("argv, start", [
    (["lora_train=true"], "error: lora_train=true needs base weights"),
    (["nan_tolerance=0"], "error: nan_tolerance=0 must be a positive integer"),
])
def test_train_cli_bad_input_is_one_line_and_non_zero(tmp_path, argv, start):
    result = subprocess.run([sys.executable, "train.py", *argv, f"runs_root={tmp_path}", "max_steps=1"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(start)
    assert not list(tmp_path.rglob("checkpoints")) and not list(tmp_path.glob("*/config.yaml"))  # the run config
