"""Checkpoints: when to write one (`CheckpointPolicy`), and the `TrainState` dict written to and read
from `step-<N>/`, one file per key (the layout is `vdm.runs`', which sampling reads too):

    model      model.safetensors   process 0; gathered from the shards under FSDP
    ema        ema.safetensors     process 0; gathered likewise
    optimizer  optimizer.pt        process 0; under FSDP optimizer-<rank>.pt, each process its shard
    scheduler  scheduler.pt        process 0
    rng        rng-<rank>.pt       each process
    distill    distill.json        process 0; use_pd runs only: the student's round, steps and guidance
    progress   state.json          process 0, last: its presence marks a complete checkpoint

A checkpoint is written under a temporary name and renamed when complete, so a run killed while saving
leaves the previous checkpoints intact and no half-written `step-<N>`. Weights that are not finite are
refused before anything is written. Reading executes nothing: weights are safetensors, and the `.pt` files
(tensors and plain data only) load through `vdm.safe_load`, which refuses any other Python global.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from vdm.errors import AlreadyExists, BadInput, NotFound
from vdm.runs import (
    DISTILL,
    EMA,
    MODEL,
    OPTIMIZER,
    SCHEDULER,
    STATE,
    checkpoints_dir,
    latest_checkpoint,
    list_checkpoints,
    load_weights,
    read_distillation,
)
from vdm.safe_load import load_safely
from vdm.training.guard import TrainingDiverged, first_non_finite
from vdm.training.parallel import DataParallel, full_tensor
from vdm.training.state import TrainState

log = logging.getLogger(__name__)
UNTRUSTED = "nothing was loaded; resume from a checkpoint you trust, or start from its weights alone with init_from"


@dataclass(frozen=True)
class CheckpointPolicy:
    """A checkpoint every `every` steps (None: only at the end), at `max_steps` and at each step of `always`
    (the ends of distillation rounds); the last `keep` stay (None: all), and those of `always` too."""

    every: int | None
    keep: int | None
    max_steps: int
    always: frozenset[int] = field(default_factory=frozenset)

    def due(self, step: int) -> bool:
        return step == self.max_steps or step in self.always or bool(self.every) and step % self.every == 0


def gathered(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of possibly sharded ones (a collective under FSDP), kept by the writing process only."""
    out = {}
    for k, v in tensors.items():
        whole = full_tensor(v)
        if keep:
            out[k] = whole.detach().contiguous().cpu()
    return out


def non_finite_weight(parts: dict[str, dict]) -> str | None:
    """The first weight, or EMA average, holding a NaN or Inf in this process's part of the state, or None."""
    name = first_non_finite(parts["model"])
    if name is not None:
        return repr(name)
    name = first_non_finite(parts.get("ema", {}))
    return None if name is None else f"the EMA of {name!r}"


def save_checkpoint(run_dir: Path, state: TrainState, parallel: DataParallel, keep: int | None = None,
                    protect: Collection[int] = ()) -> Path:
    """Write `step-<N>` for the state's step (every process calls this); then remove all but the last `keep`,
    except the steps in `protect`."""
    step, rank, main = state.progress.step, parallel.rank, parallel.is_main
    parts = state.state_dict()
    bad = non_finite_weight(parts)
    if parallel.any(bad is not None):
        where = bad if bad is not None else "a weight of another process"
        raise TrainingDiverged(f"step {step}: {where} is not finite; checkpoint step-{step} not written (the last "
                               f"one is {latest_checkpoint(run_dir) or 'none'})")
    final = checkpoints_dir(run_dir) / f"step-{step}"
    tmp = checkpoints_dir(run_dir) / f".step-{step}.tmp"
    if final.exists():  # every process sees it (one machine), so none waits for the others below
        raise AlreadyExists(f"checkpoint {final} already exists; refusing to overwrite it")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    torch.save(parts["rng"], tmp / f"rng-{rank}.pt")
    if parallel.sharded:
        torch.save(parts["optimizer"], tmp / f"optimizer-{rank}.pt")
    model = gathered(parts["model"], keep=main)
    ema = gathered(parts["ema"], keep=main) if "ema" in parts else None
    if main:
        save_file(model, tmp / MODEL)
        if ema is not None:
            save_file(ema, tmp / EMA)
        if not parallel.sharded:
            torch.save(parts["optimizer"], tmp / OPTIMIZER)
        torch.save(parts["scheduler"], tmp / SCHEDULER)
        if "distill" in parts:
            (tmp / DISTILL).write_text(json.dumps(parts["distill"], indent=2))
    parallel.barrier()
    if main:
        (tmp / STATE).write_text(json.dumps({**parts["progress"], "world_size": parallel.world_size}, indent=2))
        os.replace(tmp, final)
        if keep:
            for old in list_checkpoints(run_dir)[:-keep]:
                if int(old.name.removeprefix("step-")) not in protect:
                    shutil.rmtree(old)
        log.info("saved checkpoint %s", final)
    parallel.barrier()
    return final


def check_resumable(checkpoint: Path, parallel: DataParallel) -> None:
    """Refuse, before anything is written, a checkpoint whose optimizer state this run cannot load: sharded
    (FSDP) state in an unsharded run or the reverse, or shards for another number of processes."""
    checkpoint = Path(checkpoint)
    processes = json.loads((checkpoint / STATE).read_text()).get("world_size")
    if not parallel.sharded and not (checkpoint / OPTIMIZER).is_file():
        raise BadInput(f"{checkpoint} holds a sharded (FSDP) optimizer; resume it with fsdp=true and {processes} "
                       "processes, or start from its weights with init_from")
    if parallel.sharded and not (checkpoint / "optimizer-0.pt").is_file():
        raise BadInput(f"{checkpoint} was saved without FSDP (one {OPTIMIZER}); resume it without fsdp, or start "
                       "from its weights with init_from")
    if parallel.sharded and processes != parallel.world_size:
        raise BadInput(f"{checkpoint} was saved by {processes} FSDP processes; resume it with as many (this run "
                       f"has {parallel.world_size})")


def load_checkpoint(checkpoint: Path, state: TrainState, parallel: DataParallel) -> None:
    """Restore every part of `state` from `checkpoint` (every process calls this; see `check_resumable`)."""
    checkpoint, rank = Path(checkpoint), parallel.rank
    weights = load_weights(checkpoint)
    if set(weights) != set(state.model.state_dict()):
        raise BadInput(f"{checkpoint}: its weights do not match this run's network "
                       "(was it saved with another network or lora_train setting?)")
    optimizer = checkpoint / (f"optimizer-{rank}.pt" if parallel.sharded else OPTIMIZER)
    parts = {"model": weights, "optimizer": load_safely(optimizer, advice=UNTRUSTED),
             "scheduler": load_safely(checkpoint / SCHEDULER, advice=UNTRUSTED),
             "progress": {k: v for k, v in json.loads((checkpoint / STATE).read_text()).items() if k != "world_size"}}
    if state.ema is not None:
        if not (checkpoint / EMA).is_file():
            raise NotFound(f"{checkpoint} has no {EMA} but ema.enabled=true")
        parts["ema"] = load_weights(checkpoint / EMA)
    distill = read_distillation(checkpoint)
    if (distill is None) != (state.distill is None):
        raise BadInput(f"{checkpoint} is {'not ' if distill is None else ''}a progressive-distillation checkpoint; "
                       f"resume it with use_pd={'false' if distill is None else 'true'}")
    if distill is not None:
        parts["distill"] = distill
    rng = checkpoint / f"rng-{rank}.pt"
    if rng.is_file():
        parts["rng"] = load_safely(rng, advice=UNTRUSTED)
    else:
        log.warning("%s: no RNG state for process %d (resumed with a different number of processes)", checkpoint,
                    rank)
    state.load_state_dict(parts)
