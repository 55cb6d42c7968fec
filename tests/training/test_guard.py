"""The NaN/Inf guard: non-finite steps are skipped and counted, `nan_tolerance` in a row stop the run, and
non-finite weights never reach a checkpoint. Bad values (and FSDP options) are one-line errors that
overwrite nothing."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vdm import runs
from vdm.training.data import StreamSampler
from vdm.training.guard import TrainingDiverged
from vdm.training.loop import train

LENGTH = 1000


def poisoned(train_cfg, bad_steps: list[int], *overrides: str):
    """A config whose data stream yields a NaN clip in each of `bad_steps` (1-based; batch 2, one process)."""
    sampler = StreamSampler(LENGTH, batch_size=2, seed=0)
    bad_items = [sampler.index(2 * (step - 1)) for step in bad_steps]
    return train_cfg("data._target_=tests.training.worlds.PoisonedWorld", f"data.length={LENGTH}",
                     f"+data.bad_items={bad_items}", "checkpoint.every=1", *overrides)


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}"


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {s.step: s.value for s in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def test_non_finite_steps_are_skipped_counted_and_tolerated(train_cfg):
    cfg = poisoned(train_cfg, [2, 3], "max_steps=5", "nan_tolerance=3")
    run_dir = Path(cfg.runs_root) / cfg.run_name
    train(cfg, run_dir)

    assert [p.name for p in runs.list_checkpoints(run_dir)] == [f"step-{s}" for s in range(1, 6)]
    first = checkpoint(run_dir, 1)
    for step in (2, 3):  # nothing moved: weights, EMA, optimizer moments, schedule
        for name in ("model.safetensors", "ema.safetensors"):
            a, b = load_file(first / name), load_file(checkpoint(run_dir, step) / name)
            assert all(torch.equal(a[k], b[k]) for k in a), (step, name)
        oa, ob = torch.load(first / "optimizer.pt"), torch.load(checkpoint(run_dir, step) / "optimizer.pt")
        assert all(torch.equal(oa["state"][i][k], ob["state"][i][k]) for i in oa["state"] for k in oa["state"][i])
        assert torch.load(checkpoint(run_dir, step) / "scheduler.pt")["last_epoch"] == 1
    after = load_file(checkpoint(run_dir, 4) / "model.safetensors")
    assert any(not torch.equal(after[k], v) for k, v in load_file(first / "model.safetensors").items())
    assert torch.load(checkpoint(run_dir, 5) / "scheduler.pt")["last_epoch"] == 3  # 3 updates in 5 steps
    state = runs.read_state(checkpoint(run_dir, 5))
    assert (state.step, state.skipped_steps, state.skips_in_a_row, state.data_position) == (5, 2, 0, 10)
    assert runs.read_state(checkpoint(run_dir, 3)).skips_in_a_row == 2

    assert scalars(run_dir, "train/skipped_steps") == {1: 0.0, 2: 1.0, 3: 2.0, 4: 2.0, 5: 2.0}
    assert sorted(scalars(run_dir, "train/loss")) == [1, 4, 5]  # skipped steps have no loss point


def test_nan_tolerance_steps_in_a_row_stop_the_run_without_a_bad_checkpoint(train_cfg):
    cfg = poisoned(train_cfg, [2, 3], "max_steps=5", "nan_tolerance=2")
    run_dir = Path(cfg.runs_root) / cfg.run_name
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, run_dir)
    message = str(err.value)
    assert message.startswith("step 3: loss or gradient norm not finite for 2 steps in a row (nan_tolerance=2)")
    assert "\n" not in message
    assert [p.name for p in runs.list_checkpoints(run_dir)] == ["step-1", "step-2"]
    assert all(torch.isfinite(v).all() for v in load_file(checkpoint(run_dir, 2) / "model.safetensors").values())


def test_non_finite_weights_are_never_checkpointed(train_cfg):
    # an infinite learning rate: the first update is finite in loss and gradient, but its weights are not
    cfg = train_cfg("optim._target_=torch.optim.SGD", "~optim.betas", "~optim.weight_decay", "optim.lr=inf",
                    "checkpoint.every=1", "max_steps=2")
    run_dir = Path(cfg.runs_root) / cfg.run_name
    with pytest.raises(TrainingDiverged, match=r"^step 1: '[\w.]+' is not finite; checkpoint step-1 not written "
                                               r"\(the last one is none\)$"):
        train(cfg, run_dir)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


@pytest.mark.parametrize("overrides, message", [
    (["nan_tolerance=0"], "nan_tolerance=0 must be a positive integer (consecutive non-finite steps skipped before "
                          "the run stops)"),
    (["video_latent_frames=0"], "video_latent_frames=0 must be >= 1 or null (the whole clip)"),
    (["fsdp=true", "mixed_precision=fp16"], "mixed_precision=fp16 is not supported with fsdp=true: fp16 needs a loss "
                                            "scaler that FSDP shards; use mixed_precision=bf16"),
    (["fsdp=true", "compile_model=true"], "compile_model=true is not supported with fsdp=true; set "
                                          "compile_model=false"),
])
def test_bad_value_is_one_line_and_overwrites_nothing(train_cfg, overrides, message):
    cfg = train_cfg("max_steps=2")
    run_dir = Path(cfg.runs_root) / cfg.run_name
    train(cfg, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ValueError) as err:
        train(train_cfg("max_steps=3", "resume=auto", *overrides), run_dir)
    assert str(err.value) == message
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
