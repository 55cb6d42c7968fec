"""The training loop: checkpoints, TensorBoard, exact resume, crash safety, files that would run code, LoRA."""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vdm import runs
from vdm.networks import DiffusionTransformer
from vdm.safe_load import load_safely
from vdm.training import checkpoint as ckpt
from vdm.training.loop import store_frozen_in, train
from vdm.training.state import RNGState


def run(cfg) -> Path:
    run_dir = Path(cfg.runs_root) / cfg.run_name
    train(cfg, run_dir)
    return run_dir


def test_few_steps_write_a_loadable_checkpoint_and_tensorboard(train_cfg):
    run_dir = run(train_cfg("video_every=2", "video_num_steps=2", "video_samples=2"))
    steps = [p.name for p in runs.list_checkpoints(run_dir)]
    assert steps == ["step-2", "step-4"]
    final = run_dir / "checkpoints" / "step-4"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.pt", "rng-0.pt", "state.json"):
        assert (final / name).is_file(), name
    assert runs.read_state(final).step == 4 and runs.read_state(final).data_position == 8
    assert (run_dir / "config.yaml").is_file()
    # the weights file is a plain DiT state dict: it loads into a fresh network with strict checks
    net = DiffusionTransformer(num_attention_heads=2, attention_head_dim=16, time_embed_dim=32, num_layers=2,
                               in_channels=48, out_channels=48, text_embed_dim=384, sample_height=8, sample_width=8,
                               sample_frames=9, temporal_compression_ratio=1, max_text_seq_length=16,
                               use_rotary_positional_embeddings=True, head_hidden_dim=64)
    net.load_checked_state_dict(load_file(final / "model.safetensors"), source="test")

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for scalar in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_sec"):
        assert scalar in tags["scalars"] and len(events.Scalars(scalar)) == 4
    assert {"video/inputs", "video/reconstructions", "video/samples"} <= set(tags["images"])
    gif = events.Images("video/samples")[0].encoded_image_string
    assert gif[:6] in (b"GIF87a", b"GIF89a")
    assert "conditioning/txt/text_summary" in tags["tensors"]


def test_resume_is_exact(train_cfg, tmp_path):
    straight = run(train_cfg("run_name=straight"))
    interrupted = run(train_cfg("run_name=interrupted"))
    import shutil
    shutil.rmtree(interrupted / "checkpoints" / "step-4")  # as if killed after step 2
    train(train_cfg("run_name=interrupted", "resume=auto"), interrupted)

    a, b = straight / "checkpoints" / "step-4", interrupted / "checkpoints" / "step-4"
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    oa, ob = torch.load(a / "optimizer.pt"), torch.load(b / "optimizer.pt")
    for pid, sa in oa["state"].items():
        for key, value in sa.items():
            assert torch.equal(value, ob["state"][pid][key]), (pid, key)
    assert runs.read_state(a) == runs.read_state(b)


def test_fresh_run_refuses_a_folder_with_checkpoints(train_cfg):
    cfg = train_cfg("max_steps=2")
    run(cfg)
    with pytest.raises(FileExistsError, match="already holds checkpoints; pass resume=auto"):
        run(cfg)


def test_crash_while_saving_leaves_the_previous_checkpoint(train_cfg, monkeypatch):
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "step-4" in str(path) and str(path).endswith("optimizer.pt"):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    cfg = train_cfg()
    run_dir = Path(cfg.runs_root) / cfg.run_name
    with pytest.raises(OSError, match="simulated"):
        train(cfg, run_dir)
    assert [p.name for p in runs.list_checkpoints(run_dir)] == ["step-2"]
    assert not (run_dir / "checkpoints" / "step-4").exists()
    assert load_file(run_dir / "checkpoints" / "step-2" / "model.safetensors")
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    train(train_cfg("resume=auto"), run_dir)  # the stale temporary folder does not get in the way
    assert [p.name for p in runs.list_checkpoints(run_dir)] == ["step-2", "step-4"]


def test_lora_run_trains_and_saves_only_adapters(train_cfg):
    base_run = run(train_cfg("run_name=base", "max_steps=2"))
    base = load_file(base_run / "checkpoints" / "step-2" / "model.safetensors")
    lora_run = run(train_cfg("run_name=lora", "lora_train=true", "lora.rank=2", "optim.lr=1e-2"))
    saved = load_file(lora_run / "checkpoints" / "step-4" / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in saved.items())

    # every base weight of the trained LoRA network is still the base run's
    from vdm.sampling import load_run
    engine = load_run(lora_run / "checkpoints" / "step-4", use_ema=False).engine
    state = engine.network.state_dict()
    for k, v in base.items():
        key = k if k in state else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key], v), k


def test_bf16_lora_run_stores_its_frozen_base_in_bf16(train_cfg, monkeypatch):
    from vdm.training import loop

    run(train_cfg("run_name=base", "max_steps=2"))
    seen = []
    monkeypatch.setattr(loop, "store_frozen_in", lambda engine, dtype: (seen.append(engine),
                                                                        store_frozen_in(engine, dtype)))
    lora_run = run(train_cfg("run_name=lora", "lora_train=true", "lora.rank=2", "optim.lr=1e-2",
                             "mixed_precision=bf16"))
    (engine,) = seen
    dtypes = {name: p.dtype for name, p in engine.network.named_parameters()}
    assert {d for name, d in dtypes.items() if "lora_" not in name} == {torch.bfloat16}
    assert {d for name, d in dtypes.items() if "lora_" in name} == {torch.float32}  # the optimizer's weights
    assert engine.conditioner.embedders[0].encoder.dtype == torch.bfloat16  # frozen text encoder too
    saved = load_file(lora_run / "checkpoints" / "step-4" / "model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in saved.values())
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in saved.items())


def test_lora_without_base_weights_says_how_to_make_them(train_cfg):
    with pytest.raises(FileNotFoundError, match="lora_train=true needs base weights: no full training run .* "
                                                "train one first with `python train.py`"):
        run(train_cfg("lora_train=true"))


def test_lr_scale_that_does_not_divide_the_frame_is_refused_before_writing(train_cfg):
    cfg = train_cfg("lr_scale=3")
    with pytest.raises(ValueError, match=r"lr_scale=3 does not divide the frame size 32x32; valid: \[2, 4, 8, 16, 32\]"):
        run(cfg)
    assert not (Path(cfg.runs_root) / cfg.run_name / "config.yaml").exists()


def test_super_resolution_training_runs(train_cfg):
    run_dir = run(train_cfg("lr_scale=4", "max_steps=2"))
    weights = load_file(run_dir / "checkpoints" / "step-2" / "model.safetensors")
    assert weights["patch_embed.proj.weight"].shape[1] == 96  # latent + low-resolution latent channels


class RunsShell:
    """Unpickles by calling os.system(command): loaded with weights_only=False, the command runs."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def rig(file: Path, marker: Path) -> None:
    """Re-save a checkpoint file with one extra object whose unpickling would create `marker`."""
    state = torch.load(file, weights_only=True)
    state["extra"] = RunsShell(f"touch '{marker}'")
    torch.save(state, file)


def test_rigged_checkpoint_would_run_its_command(tmp_path):
    """The control for the refusals below: a rigged file does run its command when fully unpickled."""
    file, marker = tmp_path / "rng-0.pt", tmp_path / "PWNED"
    torch.save({"torch": torch.get_rng_state()}, file)
    rig(file, marker)
    torch.load(file, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["rng-0.pt", "optimizer.pt", "scheduler.pt"])
def test_a_checkpoint_file_holding_code_is_refused_and_nothing_runs(train_cfg, tmp_path, name):
    run_dir = run(train_cfg("max_steps=2"))
    marker = tmp_path / "PWNED"
    rig(run_dir / "checkpoints" / "step-2" / name, marker)
    with pytest.raises(ValueError) as info:  # resume=auto reads every .pt file of the checkpoint
        train(train_cfg("max_steps=4", "resume=auto"), run_dir)
    assert str(info.value).startswith(f"{run_dir / 'checkpoints' / 'step-2' / name} contains the Python global "
                                      f"{os.system.__module__}.system, which vdm refuses to execute")
    assert "\n" not in str(info.value) and not marker.exists()
    assert [p.name for p in runs.list_checkpoints(run_dir)] == ["step-2"]  # nothing was trained or written
    # init_from reads the weights alone: a new run starts from them, and the rigged file never runs
    fresh = run(train_cfg("run_name=fresh", "max_steps=2", f"init_from={run_dir}"))
    assert runs.latest_checkpoint(fresh).name == "step-2" and not marker.exists()


def test_rng_state_round_trips_through_plain_tensors(tmp_path):
    random.random(), np.random.rand(), torch.rand(1)  # move every generator off its seed
    file = tmp_path / "rng-0.pt"
    torch.save(RNGState().state_dict(), file)
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    RNGState().load_state_dict(load_safely(file))  # weights_only: no numpy object in the file
    assert (random.random(), np.random.rand(), np.random.randn()) == expected[:3] and torch.equal(torch.rand(3),
                                                                                                  expected[3])
    # a checkpoint written before the tensor layout (numpy's own tuple) still loads
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, file)
    after = (random.random(), np.random.rand())
    RNGState().load_state_dict(load_safely(file))
    assert (random.random(), np.random.rand()) == after
