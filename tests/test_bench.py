"""The benchmark scripts run (a CPU smoke run; the real figures need a GPU)."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    """A script under bench/ as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # compiles both sides: ~3 min on 2 cores
def test_gpu_check_smoke_on_cpu(capsys):
    gpu_check = load_bench("gpu_check")
    assert gpu_check.main(["--device", "cpu", "--layers", "1", "--latent", "3,4,4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "vdm:" in out and "diffusers:" in out and "ratios vdm/diffusers" in out
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 0
        assert "no CUDA GPU present" in capsys.readouterr().out


def test_sample_speed_runs_both_sides(capsys):
    sample_speed = load_bench("sample_speed")
    assert sample_speed.main(["--config", "tiny", "--device", "cpu", "--steps", "2", "--repeats", "1",
                              "--cache", "pab:2"]) == 0  # the uncached row is the same code with no cache
    out = capsys.readouterr().out
    assert "vdm:" in out and "diffusers:" in out and "speed ratio diffusers/vdm" in out and "-- cache pab:2" in out
    # both sides ran the same blocks (2 layers, 2 steps; PAB skips attention, not blocks)
    assert [line.split(" s/step, ")[1].split(" block")[0] for line in out.splitlines() if "s/step" in line] == ["4", "4"]


@pytest.mark.slow
def test_sample_speed_sets_one_process_against_two(capsys):
    """--processes 2 --parallel ulysses: one process and a torchrun of two on the same video, the same latent."""
    sample_speed = load_bench("sample_speed")
    assert sample_speed.main(["--config", "tiny", "--device", "cpu", "--steps", "2", "--repeats", "1",
                              "--processes", "2", "--parallel", "ulysses"]) == 0
    out = capsys.readouterr().out
    assert " 1 process  :" in out and " 2 processes:" in out and "speed-up 1 -> 2 processes" in out
    difference = float(out.split("latent difference (max relative): ")[1].split()[0])
    assert difference < 1e-5


def test_multiprompt_reports_schedules_and_processes(capsys):
    """One process here (the 2-process launch is the same split tests/sampling/test_distributed_* check)."""
    multiprompt = load_bench("multiprompt")
    assert multiprompt.main(["--layers", "1", "--heads", "1", "--steps", "3", "--processes", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "reuse / reference" in out and "max |latent difference|" in out
    rows = out.split("segment passes split over processes")[1].splitlines()
    assert rows[2].split("|")[0].strip() == "1" and rows[2].split("|")[-1].strip() == "0.0e+00"


def test_train_speed_times_both_recipes(capsys):
    """Two steps of each recipe, each in its own process, through the loop's own train_step."""
    train_speed = load_bench("train_speed")
    assert train_speed.main(["--steps", "2", "--warmup", "1", "--repeats", "1", "--overrides", "batch_size=2",
                             "--reference", "batch_size=2 network.num_layers=1"]) == 0
    out = capsys.readouterr().out
    assert "default:" in out and "reference:" in out and "speed ratio default/reference" in out
    assert "overrides: batch_size=2 network.num_layers=1" in out


def test_cache_table_scores_every_setting_beside_no_cache(tmp_path, capsys):
    """A tiny run, 3 captions (6 steps recorded for the fit), 3 steps: one row per setting, the uncached one at PSNR inf against itself, TeaCache
    with coefficients fitted on the spot; the rows' samples are scored by the synthetic world's judges."""
    import json

    from tests.test_sample import trained_run

    cache_table = load_bench("cache_table")
    run_dir = trained_run(tmp_path)
    out = tmp_path / "table"
    assert cache_table.main(["--checkpoint", str(run_dir), "--out", str(out), "--captions", "3", "--per-caption", "1",
                             "--steps", "3", "--fit-captions", "3", "--settings", "none", "pab:2", "teacache:0.5"]) == 0
    table = json.loads((out / "table.json").read_text())
    assert [r["setting"] for r in table] == ["none", "pab:2", "teacache:0.5"]
    assert table[0]["psnr"] == float("inf") and table[0]["blocks"] == 3 * 2  # 3 steps x the tiny run's 2 layers
    # PAB at timesteps 999 (outside (100, 800): computed), 666 (reused), 333 (every 2nd call: computed), 2 layers
    assert table[1]["attention"] == 2 * 2 and table[1]["blocks"] == 3 * 2
    assert table[2]["blocks"] <= table[0]["blocks"] and set(table[2]["strict"]) == set(table[0]["strict"])
    printed = capsys.readouterr().out
    assert "TeaCache coefficients fitted on 3 captions" in printed and "teacache:0.5" in printed
