"""Training checkpoints: a folder of stateful parts under fixed names, written atomically.

`<run>/checkpoints/step-<N>/`:
  model.safetensors    the network's weights (a LoRA run: the adapter weights alone)
  ema.safetensors      the EMA of the same weights (when EMA is on)
  optimizer.pt         optimizer state (optimizer-<rank>.pt per rank when sharded, as under FSDP)
  scheduler.pt         learning-rate scheduler state
  rng-<rank>.pt        python / numpy / torch (/ cuda) RNG states of each process
  state.json           step, data position, whether it is a LoRA checkpoint

A checkpoint is written under a temporary name and renamed when complete, so a run killed while
saving leaves the previous checkpoints intact and no half-written `step-<N>`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL, EMA, OPTIMIZER, SCHEDULER, STATE = "model.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.pt", \
    "state.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    data_position: int = 0  # global samples drawn from the data stream
    lora: bool = False


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


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and
             (p / STATE).is_file()]
    return [p for _, p in sorted(steps)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


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


def read_state(checkpoint: Path) -> TrainState:
    raw = json.loads((Path(checkpoint) / STATE).read_text())
    return TrainState(step=raw["step"], data_position=raw["data_position"], lora=raw.get("lora", False))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint folder (its model.safetensors) or a .safetensors file."""
    path = Path(path)
    file = path / MODEL if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such weights file (expected a checkpoint folder with {MODEL} "
                                "or a .safetensors file)")
    try:
        return load_file(file)
    except Exception as err:  # safetensors raises several types for a damaged file
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from err


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
