"""One video on several processes: `cfg_parallel=true` (its guidance branches) and `ulysses=N` (its tokens), and
the checks that a job's processes, options and model allow them.

The job's processes are groups of (2 if cfg_parallel else 1) x ulysses processes (`vdm.distributed.
split_processes`); each group samples its share of the videos (prompt sharding, as without either option) and
every group a share of each multi-prompt video's segment passes. The first process of a group decodes and
writes its videos.
"""

from __future__ import annotations

from omegaconf import DictConfig

from vdm.distributed import Processes, VideoProcesses, split_processes
from vdm.errors import BadInput
from vdm.networks.controls import CONTROLS
from vdm.sampling.jobs import Unit


def parallel_sizes(cfg: DictConfig) -> tuple[int, int]:
    """(guidance branches per video's group, token shards per video)."""
    shards = cfg.get("ulysses")
    return (2 if cfg.get("cfg_parallel") else 1), 1 if shards is None else int(shards)


def check_parallel(cfg: DictConfig, units: list[Unit], processes: Processes) -> int:
    """The options against the job's processes and videos, before any load; returns the number of groups."""
    branches, shards = parallel_sizes(cfg)
    if shards < 1:
        raise BadInput(f"ulysses={cfg.ulysses} must be >= 1 (the processes one video's tokens are split over)")
    world = processes.world_size
    if branches == 2 and world % 2:
        raise BadInput(f"cfg_parallel=true puts the conditional and unconditional branches on two processes; this "
                       f"job has {world} (launch it with torchrun --nproc_per_node 2, or a multiple of 2"
                       f"{f' x ulysses={shards}' if shards > 1 else ''})")
    if world % (branches * shards):
        raise BadInput(f"ulysses={shards} does not divide the job's processes: {world} processes "
                       f"{'with cfg_parallel=true ' if branches == 2 else ''}are groups of {branches * shards} "
                       f"(launch a multiple of {branches * shards})")
    if branches == 2 and (any(u.shared for u in units) or cfg.mode != "sample"):
        raise BadInput("cfg_parallel=true samples single-prompt videos for now; multi-prompt videos already split "
                       "their segment passes over the processes, and edit / reweight pairs run on one (ulysses= "
                       "splits both)")
    if shards > 1:
        seeing = [j.control for u in units for j in u.jobs if CONTROLS[j.control].reads_attention]
        if seeing:
            raise BadInput(f"ulysses={shards} gives each process a share of the attention heads; {seeing[0]} reads "
                           "the attention of every head: sample it without ulysses=")
    return world // (branches * shards)


def check_heads(cfg: DictConfig, heads: int) -> None:
    """ulysses=N splits the network's heads N ways."""
    shards = parallel_sizes(cfg)[1]
    if heads % shards:
        valid = [n for n in range(1, heads + 1) if heads % n == 0]
        raise BadInput(f"ulysses={shards} does not divide the network's {heads} attention heads "
                       f"(network.num_attention_heads); valid: {', '.join(map(str, valid))}")


def check_guidance(cfg: DictConfig, guider) -> None:
    if cfg.get("cfg_parallel") and guider.num_branches != 2:
        raise BadInput(f"cfg_parallel=true needs guidance (guider={type(guider).__name__} evaluates "
                       f"{guider.num_branches} branch): give guider=cfg or dynamic_cfg with cfg=<scale>")


def video_processes(cfg: DictConfig, processes: Processes) -> VideoProcesses:
    """The job's processes as groups sampling one video each (every process calls it alike)."""
    return split_processes(processes, *parallel_sizes(cfg))
