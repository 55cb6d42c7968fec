"""FSDP (FSDP2 `fully_shard`) on 2 CPU processes (gloo) against one process over the same global batches:
loss, weights, EMA, clipping by the global norm, exact resume, the VAE encode, media, LoRA in bf16."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.training.fsdp_worker import overrides, run
from vdm import runs
from vdm.build import compose
from vdm.training.loop import train

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TOLERANCE = 1e-6  # float32; measured: weights and EMA within 3e-8, losses within 2e-8, grad norms equal


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKLCogVideoX

    from tests.tiny import TINY_VAE_CONFIG

    folder = tmp_path_factory.mktemp("vae")
    AutoencoderKLCogVideoX(**TINY_VAE_CONFIG).save_pretrained(folder)
    return folder


def scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return [s.value for s in events.Scalars(tag)]


def max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def test_fsdp_matches_one_process_and_resumes_exactly(tmp_path, vae_dir):
    torchrun = Path(sys.executable).parent / "torchrun"
    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    worker = subprocess.Popen([str(torchrun), "--nproc_per_node", "2", "--master_port", "29537",
                               str(ROOT / "tests" / "training" / "fsdp_worker.py"), str(sharded), str(vae_dir)],
                              cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for name in ("fsdp", "clip"):  # meanwhile, the one-process references (batch 2 x 2)
            run(single, vae_dir, name, world_size=1)
        _, stderr = worker.communicate(timeout=300)
    finally:
        worker.kill()
    assert worker.returncode == 0, stderr[-3000:]

    # AdamW + EMA + 2 micro-batches + clipping + the VAE encode: the same losses, weights and averages
    a, b = sharded / "fsdp" / "checkpoints" / "step-3", single / "fsdp" / "checkpoints" / "step-3"
    assert scalars(sharded / "fsdp", "train/loss") == pytest.approx(scalars(single / "fsdp", "train/loss"), abs=TOLERANCE)
    assert max_difference(a / "model.safetensors", b / "model.safetensors") < TOLERANCE
    assert max_difference(a / "ema.safetensors", b / "ema.safetensors") < TOLERANCE
    assert load_file(a / "model.safetensors").keys() == load_file(b / "model.safetensors").keys()
    assert runs.read_state(a) == runs.read_state(b)
    # sharded: each process saved its half of every optimizer state (the 32-row patch embedding here)
    shards = [torch.load(a / f"optimizer-{r}.pt")["state"][0]["exp_avg"] for r in (0, 1)]
    assert [s.shape[0] for s in shards] == [16, 16] and not (a / "optimizer.pt").exists()
    events = EventAccumulator(str(sharded / "fsdp" / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert {"video/inputs", "video/reconstructions", "video/samples"} <= set(events.Tags()["images"])

    # resumed at step 2 from that run's checkpoint: bit-for-bit the same step 3, optimizer shards included
    c = sharded / "resumed" / "checkpoints" / "step-3"
    for name in ("model.safetensors", "ema.safetensors"):
        assert max_difference(a / name, c / name) == 0.0, name
    for r in (0, 1):
        sa, sc = torch.load(a / f"optimizer-{r}.pt")["state"], torch.load(c / f"optimizer-{r}.pt")["state"]
        assert all(torch.equal(sa[i][k], sc[i][k]) for i in sa for k in sa[i])

    # a sharded checkpoint is refused, before anything is written, by a run that cannot load its optimizer shards
    cfg = compose([*overrides(single, vae_dir, "fsdp", 1), "run_name=elsewhere", f"resume={a}"], config_name="train")
    with pytest.raises(ValueError, match=r"holds a sharded \(FSDP\) optimizer; resume it with fsdp=true and 2 "
                                         r"processes, or start from its weights with init_from$"):
        train(cfg, single / "elsewhere")
    assert not (single / "elsewhere").exists()

    # SGD with an active threshold: a clip by each shard's own norm would scale each shard differently from
    # the one process (Adam would hide that: it is invariant to the gradient's scale)
    assert min(scalars(single / "clip", "train/grad_norm")) > 0.01 * 10  # clip_grad_norm=0.01 acts
    assert scalars(sharded / "clip", "train/grad_norm") == pytest.approx(scalars(single / "clip", "train/grad_norm"),
                                                                         abs=TOLERANCE)
    assert max_difference(sharded / "clip" / "checkpoints" / "step-2" / "model.safetensors",
                          single / "clip" / "checkpoints" / "step-2" / "model.safetensors") < TOLERANCE

    # LoRA under FSDP with bf16: blocks mix frozen bf16 and trainable float32 weights; only adapters are saved
    lora = load_file(sharded / "lora" / "checkpoints" / "step-2" / "model.safetensors")
    assert lora and all("lora_" in k and v.dtype == torch.float32 and torch.isfinite(v).all() for k, v in lora.items())
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in lora.items())
    assert "video/samples" in EventAccumulator(str(sharded / "lora" / "tb"), size_guidance={"images": 0}).Reload().Tags()["images"]
