"""Writing training checkpoints (a folder of stateful parts under fixed names, atomically) and loading
the training state back; the layout and reading it are `vdm.runs`'.

A checkpoint is written under a temporary name and renamed when complete, so a run killed while
saving leaves the previous checkpoints intact and no half-written `step-<N>`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from vdm.runs import (
    EMA,
    MODEL,
    OPTIMIZER,
    SCHEDULER,
    STATE,
    TrainState,
    checkpoints_dir,
    list_checkpoints,
    read_state,
)

log = logging.getLogger(__name__)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, state: TrainState, weights: dict[str, torch.Tensor], *, optimizer=None,
                    scheduler=None, ema_weights: dict[str, torch.Tensor] | None = None, rank: int = 0,
                    world_size: int = 1, keep: int | None = None, barrier=lambda: None,
                    sharded_optimizer: bool = False) -> Path:
    """Write `step-<N>` atomically. Every rank writes its RNG state (and, when the optimizer is sharded
    as under FSDP, its optimizer shard as `optimizer-<rank>.pt`); rank 0 writes the rest and renames."""
    final = checkpoints_dir(run_dir) / f"step-{state.step}"
    tmp = checkpoints_dir(run_dir) / f".step-{state.step}.tmp"
    if rank == 0:
        if final.exists():
            raise FileExistsError(f"checkpoint {final} already exists; refusing to overwrite it")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    if sharded_optimizer and optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / f"optimizer-{rank}.pt")
    if rank == 0:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / MODEL)
        if ema_weights is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema_weights.items()}, tmp / EMA)
        if optimizer is not None and not sharded_optimizer:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER)
    barrier()
    if rank == 0:
        # state.json last: its presence marks a complete checkpoint (list_checkpoints relies on it)
        (tmp / STATE).write_text(json.dumps({**asdict(state), "world_size": world_size}, indent=2))
        os.replace(tmp, final)
        if keep:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def load_training_state(checkpoint: Path, optimizer=None, scheduler=None, rank: int = 0) -> TrainState:
    checkpoint = Path(checkpoint)
    if optimizer is not None:
        shard = checkpoint / f"optimizer-{rank}.pt"
        optimizer.load_state_dict(torch.load(shard if shard.is_file() else checkpoint / OPTIMIZER, weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER, weights_only=True))
    rng_file = checkpoint / f"rng-{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s: no RNG state for rank %d (resumed with a different number of processes)", checkpoint, rank)
    return read_state(checkpoint)
