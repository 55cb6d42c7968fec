"""How the training processes share the model, behind one small interface the loop calls without
branching: `DataParallel` (every process holds all of it; a single process, or Accelerate's DDP) and
`FullyShardedDataParallel` (FSDP2: each DiT block's parameters, gradients and optimizer state, and the EMA
of them, split over the processes).

FSDP is PyTorch's `fully_shard`, applied here, not Accelerate's FSDP plugin: Accelerate enters its FSDP
mode only on GPUs (on a CPU process group it silently runs DDP instead), while `fully_shard` runs the same
code on NCCL and on gloo, so the 2-process CPU test exercises what runs on GPUs. Its parameters are
DTensors sharded one by one, so a block may mix frozen bf16 and trainable float32 weights (LoRA), and
optimizer and EMA states are DTensors laid out like the parameters they follow.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor, distribute_tensor

from vdm.errors import BadInput

log = logging.getLogger(__name__)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a possibly sharded tensor (for a DTensor a collective: every process must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a possibly sharded tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (a whole tensor, as read from a file by every process) on `like`'s device and dtype, and for a
    DTensor `like` this process's shard of it (cut locally: no communication)."""
    full = full.to(device=like.device, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full


class DataParallel:
    """Every process holds the whole model; gradients are averaged by Accelerate's DDP."""

    sharded = False  # parameters, gradients and optimizer state split over the processes
    collective_forward = False  # the network's forward needs every process (so media sampling runs on all)

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        self.is_main = accelerator.is_main_process

    def wrap(self, engine: nn.Module) -> nn.Module:
        """The module the training step calls: the engine, moved to the device and wrapped for all-reduce."""
        return self.accelerator.prepare(engine)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return self.accelerator.prepare(optimizer)

    def no_sync(self, model: nn.Module, sync: bool):
        """Micro-batches before the last of a gradient accumulation skip the gradient reduction."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    def autocast(self):
        """The run's mixed precision (bf16/fp16 autocast; nothing for mixed_precision=no)."""
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def unscale_gradients(self) -> None:
        """fp16: divide the gradients by the loss scale before their norm is taken."""
        self.accelerator.unscale_gradients()

    def skip_update(self) -> None:
        """A skipped step still tells an fp16 loss scaler that it overflowed, so that the scale drops."""
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.update()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="mean")

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any process."""
        return bool(self.accelerator.reduce(torch.tensor(float(flag), device=self.device), reduction="sum") > 0)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


class FullyShardedDataParallel(DataParallel):
    """FSDP2: one shard unit per DiT block, the rest of the network (embeddings, final layer) in the root
    unit. The frozen text encoder and first stage stay whole on every process."""

    sharded = True
    collective_forward = True

    def __init__(self, accelerator: Accelerator, reshard_after_forward: bool = True):
        super().__init__(accelerator)
        self.reshard_after_forward = reshard_after_forward
        self.network: nn.Module | None = None

    def wrap(self, engine: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        engine.to(self.device)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.network = engine.network
        with torch.no_grad():  # processes seed differently (random init, LoRA): all start from process 0's weights
            for t in (*self.network.parameters(), *self.network.buffers()):
                dist.broadcast(t.data, src=0)
        for block in getattr(self.network, "transformer_blocks", ()):
            fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(self.network, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        log.info("FSDP: network sharded over %d processes", self.world_size)
        return engine  # sharded in place: the engine's forward is the training step's

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer  # it holds the sharded parameters; bf16 needs no loss scaler (fp16 is refused)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool):
        self.network.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            self.network.set_requires_gradient_sync(True)


def make_parallel(accelerator: Accelerator, fsdp: bool, mixed_precision: str, compile_model: bool) -> DataParallel:
    """FSDP when `fsdp=true` or when `accelerate launch` ran with an FSDP config, else data parallel.
    Options FSDP cannot honour are refused here, before the run writes anything."""
    launched = accelerator.distributed_type == DistributedType.FSDP
    if not (fsdp or launched):
        return DataParallel(accelerator)
    reshard_after_forward = check_fsdp(mixed_precision, compile_model,
                                       accelerator.state.fsdp_plugin if launched else None)
    if accelerator.num_processes == 1:
        log.info("fsdp: a single process holds the whole model; training without sharding")
        return DataParallel(accelerator)
    return FullyShardedDataParallel(accelerator, reshard_after_forward)


def check_fsdp(mixed_precision: str, compile_model: bool, plugin=None) -> bool:
    """Raise a one-line error for an option FSDP cannot support; return reshard_after_forward.

    `plugin`: Accelerate's FullyShardedDataParallelPlugin when the run was launched with an FSDP config.
    """
    where = "fsdp=true" if plugin is None else "FSDP (distributed_type: FSDP in the accelerate config)"
    if mixed_precision == "fp16":
        raise BadInput(f"mixed_precision=fp16 is not supported with {where}: fp16 needs a loss scaler that "
                       "FSDP shards; use mixed_precision=bf16")
    if compile_model:
        raise BadInput(f"compile_model=true is not supported with {where}; set compile_model=false")
    if plugin is None:
        return True
    if plugin.fsdp_version != 2:
        raise BadInput(f"fsdp_version={plugin.fsdp_version} in the accelerate config: vdm shards with FSDP2 "
                       "(torch fully_shard); set fsdp_version: 2, as conf/accelerate/fsdp.yaml does")
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise BadInput("fsdp_offload_params=true in the accelerate config is not supported; set it to false")
    if plugin.activation_checkpointing:
        raise BadInput("fsdp_activation_checkpointing=true in the accelerate config is not supported; set it to "
                       "false and use network.gradient_checkpointing=true (per DiT block)")
    if plugin.cpu_ram_efficient_loading:
        raise BadInput("fsdp_cpu_ram_efficient_loading=true in the accelerate config is not supported (the text "
                       "encoder would load on process 0 only); set it to false")
    return bool(plugin.reshard_after_forward)
