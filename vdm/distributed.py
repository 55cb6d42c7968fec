"""The processes of one sampling job (`torchrun` / `accelerate launch`): which share of the work is whose,
and the few collectives that put the shares back together.

A single process is the same object with `world_size` 1, whose collectives return their input, so the code
that samples never branches on whether it runs distributed. Work is always split into contiguous blocks of
a list every process knows, so each process can tell, without asking, what every other one computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from vdm.errors import BadInput


class ProcessFailed(RuntimeError):
    """A collective failed: another process of the job stopped (the launcher stops the rest)."""


@dataclass(frozen=True)
class Processes:
    """A set of processes as seen by one of them: its `rank` among `world_size`; `group` is their
    `torch.distributed` process group (None: the job's default group, every process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU of this process on its machine
    group: Any = field(default=None, compare=False, repr=False)

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
        _collective(dist.all_gather, parts, padded.contiguous(), group=self.group)
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    def all_to_all(self, chunks: torch.Tensor) -> torch.Tensor:
        """`chunks` (world_size, ...): chunk j goes to process j; returns (world_size, ...) whose chunk i came from
        process i. Every process's chunks have the same shape."""
        if self.world_size == 1:
            return chunks
        chunks = chunks.contiguous()
        out = torch.empty_like(chunks)  # (empty_like keeps a strided input's strides, which the collective ignores)
        _collective(dist.all_to_all_single, out, chunks, group=self.group)
        return out

    def sum(self, local: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of every process's `local` (same shape everywhere), on every process."""
        if self.world_size == 1:
            return local
        total = local.clone()
        _collective(dist.all_reduce, total, group=self.group)
        return total

    def broadcast(self, obj):
        """Rank 0's `obj` on every process (a picklable object)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        _collective(dist.broadcast_object_list, box, group=self.group, group_src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            _collective(dist.barrier, group=self.group)


@dataclass(frozen=True)
class VideoProcesses:
    """How a job's processes share its videos: `units` groups of `branches.world_size` x `sequence.world_size`
    processes, each group sampling its own share of the job's videos (and every group a share of each
    multi-prompt video's segment passes). Process rank r is group g = r // (c·N), guidance branch
    b = r // N % c and sequence shard s = r % N of its group (c = 2 with cfg_parallel, N = ulysses).

    - `units`: this process's group among the groups (rank g of G; deals the videos, no collectives);
    - `branches`: the processes of its group and shard, one per guidance branch (cfg_parallel);
    - `sequence`: the processes of its group and branch, one per token shard (ulysses);
    - `video`: every process of its group (a step cache's decisions are one per video);
    - `peers`: the processes of its branch and shard in every group (they share a multi-prompt video's passes).
    """

    units: Processes = Processes()
    branches: Processes = Processes()
    sequence: Processes = Processes()
    video: Processes = Processes()
    peers: Processes = Processes()

    @property
    def writes(self) -> bool:
        """Whether this process decodes and writes its group's videos (the group's first)."""
        return self.branches.rank == 0 and self.sequence.rank == 0


def split_processes(processes: Processes, branches: int, shards: int) -> VideoProcesses:
    """`processes` (the job's) as groups of `branches` x `shards` processes; every process of the job calls it
    alike (it makes the process groups). `branches` and `shards` must divide the job's processes (checked by
    the caller, which names its keys)."""
    world, rank = processes.world_size, processes.rank
    per_group = branches * shards
    if world % per_group:
        raise BadInput(f"{world} processes cannot be split into groups of {branches} x {shards}")
    g = rank // per_group
    layouts = {  # for each kind of set: the rank lists of all such sets (in one order on every process)
        "branches": [[gg * per_group + bb * shards + ss for bb in range(branches)]
                     for gg in range(world // per_group) for ss in range(shards)],
        "sequence": [[gg * per_group + bb * shards + ss for ss in range(shards)]
                     for gg in range(world // per_group) for bb in range(branches)],
        "video": [list(range(gg * per_group, (gg + 1) * per_group)) for gg in range(world // per_group)],
        "peers": [[gg * per_group + bb * shards + ss for gg in range(world // per_group)]
                  for bb in range(branches) for ss in range(shards)],
    }
    sets = {}
    for kind, all_ranks in layouts.items():
        mine = next(ranks for ranks in all_ranks if rank in ranks)
        if len(mine) == 1:
            sets[kind] = Processes(local_rank=processes.local_rank)
        elif len(mine) == world:
            sets[kind] = replace(processes, rank=mine.index(rank))
        else:  # every process makes every group, in the same order (torch.distributed.new_group's rule)
            groups = [dist.new_group(ranks) for ranks in all_ranks] if world > 1 else []
            sets[kind] = Processes(mine.index(rank), len(mine), processes.local_rank,
                                   groups[all_ranks.index(mine)])
    units = Processes(g, world // per_group, processes.local_rank)
    return VideoProcesses(units, sets["branches"], sets["sequence"], sets["video"], sets["peers"])


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
