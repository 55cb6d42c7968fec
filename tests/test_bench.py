"""The benchmark scripts run (a CPU smoke run; the real figures need a GPU)."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--device", "cpu", "--layers", "1", "--latent", "3,4,4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "vdm:" in out and "diffusers:" in out and "ratios vdm/diffusers" in out
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 0
        assert "no CUDA GPU present" in capsys.readouterr().out


def test_sample_speed_runs_both_sides(capsys):
    spec = importlib.util.spec_from_file_location("sample_speed", ROOT / "bench" / "sample_speed.py")
    sample_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_speed)
    assert sample_speed.main(["--config", "tiny", "--device", "cpu", "--steps", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "vdm:" in out and "diffusers:" in out and "speed ratio diffusers/vdm" in out
