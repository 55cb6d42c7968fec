"""Run by `torchrun --nproc_per_node 2` in test_fsdp (and, with one process, by the test itself for the
reference runs): tiny FSDP trainings over the CogVideoX VAE, each process drawing every sample's noise from
the sample's index so that 2 processes and 1 process see the same global batches."""

import sys
from pathlib import Path

import torch.distributed as dist

from tests.conftest import TINY_NETWORK
from vdm.build import compose
from vdm.training.loop import train

BATCH = 2  # per process; a one-process reference takes 2 x BATCH


def overrides(runs_root: Path, vae_dir: Path, run_name: str, world_size: int) -> list[str]:
    """Each run of the test: `fsdp` (AdamW, EMA, accumulation, clipping, media, offload; checkpoints at 2
    and 3), `resumed` (fsdp continued from its step 2), `clip` (SGD with an active clip threshold: Adam
    would hide a per-shard clip), `lora` (bf16 LoRA over fsdp's weights, frozen base in bf16)."""
    common = [*TINY_NETWORK, f"runs_root={runs_root}", f"run_name={run_name}", f"batch_size={BATCH * 2 // world_size}",
              "fsdp=true", "log_every=1", "sampler.verbose=false", "scheduler.warmup_steps=1",
              "data._target_=tests.training.worlds.IndexedWorld", "loss._target_=tests.training.worlds.SeededVideoLoss",
              "conditioner.embedders.0.ucg_rate=0", "first_stage=cogvideox_vae", f"first_stage.model.path={vae_dir}",
              "first_stage.model.subfolder=null", "first_stage.model.sample_posterior=false",
              "network.temporal_compression_ratio=4", "network.gradient_checkpointing=true"]
    fsdp = ["max_steps=3", "grad_accum_steps=2", "checkpoint.every=2", "clip_grad_norm=0.05", "video_every=3",
            "video_samples=1", "video_num_steps=2", "video_offload=true"]
    runs = {
        "fsdp": fsdp,
        "resumed": [*fsdp, f"resume={runs_root / 'fsdp' / 'checkpoints' / 'step-2'}"],
        "clip": ["max_steps=2", "optim._target_=torch.optim.SGD", "~optim.betas", "~optim.weight_decay",
                 "optim.lr=0.5", "clip_grad_norm=0.01", "ema.enabled=false", "video_every=0", "checkpoint.every=null"],
        "lora": ["max_steps=2", "lora_train=true", "lora.rank=2", "optim.lr=1e-2", "mixed_precision=bf16",
                 f"init_from={runs_root / 'fsdp'}", "video_every=2", "video_samples=1", "video_num_steps=2",
                 "checkpoint.every=null"],
    }
    return common + runs[run_name]


def run(runs_root: Path, vae_dir: Path, run_name: str, world_size: int) -> Path:
    cfg = compose(overrides(runs_root, vae_dir, run_name, world_size), config_name="train")
    return train(cfg, runs_root / run_name)


def main(runs_root: str, vae_dir: str) -> None:
    for name in ("fsdp", "resumed", "clip", "lora"):
        run(Path(runs_root), Path(vae_dir), name, world_size=2)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
