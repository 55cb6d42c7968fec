"""The processes of one sampling job (`torchrun` / `accelerate launch`): which share of the work is whose,
and the few collectives that put the shares back together.

A single process is the same object with `world_size` 1, whose collectives return their input, so the code
that samples never branches on whether it runs distributed. Work is always split into contiguous blocks of
a list every process knows, so each process can tell, without asking, what every other one computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vdm.errors import BadInput


class ProcessFailed(RuntimeError):
    """A collective failed: another process of the job stopped (the launcher stops the rest)."""


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU of this process on its machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, kind: str) -> str:
        """`kind` ("cpu" or "cuda") as this process's device: its own GPU when there are several processes."""
        return f"cuda:{self.local_rank}" if kind == "cuda" and self.world_size > 1 else kind

    def blocks(self, n: int) -> list[range]:
        """Contiguous, balanced blocks of range(n), one per process (the first n % world_size get one more)."""
        return [range(r * n // self.world_size, (r + 1) * n // self.world_size) for r in range(self.world_size)]

    def gather(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every process's rows, concatenated in rank order: process r holds `counts[r]` rows (`local`).
        Each process gets the same tensor."""
        if self.world_size == 1:
            return local
        if local.shape[0] != counts[self.rank]:
            raise BadInput(f"process {self.rank} holds {local.shape[0]} rows; its share is {counts[self.rank]}")
        padded = local.new_zeros((max(counts), *local.shape[1:]))  # all_gather takes equal shapes
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        _collective(dist.all_gather, parts, padded.contiguous())
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    def broadcast(self, obj):
        """Rank 0's `obj` on every process (a picklable object)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        _collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            _collective(dist.barrier)


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:  # gloo / NCCL report a vanished peer as a RuntimeError (DistBackendError)
        detail = " ".join(str(err).split())[:200]
        raise ProcessFailed(f"another process of the job stopped, so this one stops too ({detail})") from None


def init_processes(device: str) -> Processes:
    """Join the job's process group when a launcher started several processes (torchrun and accelerate
    launch set WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT): NCCL when the job samples on CUDA,
    gloo on the CPU. A single process otherwise. Called once, by the script (`sample.py`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank)


def close_processes(processes: Processes) -> None:
    if processes.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
