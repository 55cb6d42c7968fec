"""The training state: every stateful part of a run under a fixed key, saved and restored as one dict
(torchtitan's layout). `vdm.training.checkpoint` maps each key to its file in `step-<N>/`.

Each part has `state_dict()` and `load_state_dict(state)`. Under FSDP a part's state_dict holds this
process's shards (DTensors); its load_state_dict takes what the checkpoint file holds: whole tensors for
the model and EMA, this process's own shard for the optimizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from vdm.errors import BadInput
from vdm.runs import Progress
from vdm.training.ema import EMA
from vdm.training.parallel import local_tensor, shard_like

# the order parts load in: the RNG last, so that nothing drawn while loading moves it
KEYS = ("model", "ema", "optimizer", "scheduler", "progress", "distill", "rng")


class NetworkWeights:
    """The trained network's weights under the network's own names (a LoRA run: the adapters alone)."""

    def __init__(self, network: nn.Module, lora: bool):
        self.network, self.lora = network, lora

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.network.state_dict()
        return {k: v for k, v in state.items() if "lora_" in k} if self.lora else state

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        if set(weights) != set(own):
            raise BadInput("the weights do not match this run's network (saved with another network or "
                           "lora_train setting?)")
        with torch.no_grad():
            for k, v in own.items():  # state_dict tensors share the parameters' storage
                v.copy_(shard_like(weights[k], v))


class OptimizerShards:
    """An optimizer's state with this process's shards as plain tensors (what `optimizer-<rank>.pt` holds
    under FSDP); without sharding, just the optimizer's state."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        return {**state, "state": {i: {k: local_tensor(v) for k, v in s.items()} for i, s in state["state"].items()}}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
        for group in self.optimizer.param_groups:  # re-attach each shard to its parameter's layout
            for p in group["params"]:
                if not isinstance(p, DTensor):
                    continue
                slots = self.optimizer.state.get(p, {})
                for k, v in slots.items():
                    if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.to_local().shape:
                        slots[k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                      shape=p.shape, stride=p.stride())


class RNGState:
    """This process's python, numpy and torch (and CUDA) generators, as tensors and plain data, so that a
    checkpoint's `rng-<rank>.pt` loads without unpickling any Python object (`vdm.safe_load`)."""

    def state_dict(self) -> dict:
        version, words, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
                 "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        python, numpy = state["python"], state["numpy"]
        if isinstance(python, dict):
            random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
        else:  # checkpoints written before the tensor layout: random.getstate()'s own tuple
            random.setstate(python)
        if isinstance(numpy, dict):
            np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                                 numpy["has_gauss"], numpy["cached_gaussian"]))
        else:  # ... and np.random.get_state()'s tuple with its uint32 ndarray
            np.random.set_state(numpy)
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """model, optimizer, scheduler, EMA, progress (step, data position, skipped steps), the distillation
    record of a use_pd run (`vdm.training.distill.DistillRecord`) and RNG."""

    model: NetworkWeights
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    progress: Progress
    rng: RNGState = field(default_factory=RNGState)
    distill: Any = None

    def parts(self) -> dict:
        parts = {"model": self.model, "ema": self.ema, "optimizer": OptimizerShards(self.optimizer),
                 "scheduler": self.scheduler, "progress": self.progress, "distill": self.distill, "rng": self.rng}
        return {k: parts[k] for k in KEYS if parts[k] is not None}

    def state_dict(self) -> dict[str, dict]:
        return {key: part.state_dict() for key, part in self.parts().items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Load every part `state` holds (a checkpoint written by another number of processes has no RNG
        state for this one)."""
        for key, part in self.parts().items():
            if key in state:
                part.load_state_dict(state[key])
