"""Training timestep distributions over the discrete indices 0..num_idx−1."""

import torch
import torch.distributed as dist

from vdm.errors import BadInput


class DiscreteTimestepSampler:
    """Uniform timesteps; with ``stratified`` each data-parallel rank r of W draws from its own slice
    [r·T//W, (r+1)·T//W), so one global batch covers the whole range evenly. With ``low_discrepancy``
    (Kingma et al. 2021, "Variational Diffusion Models", §3.4) a batch of n is one uniform offset u plus
    the n evenly spaced points (i + u)/n of its range, shuffled: each index keeps probability 1/range, and
    the batch never bunches its noise levels, which lowers the loss's variance."""

    def __init__(self, num_idx: int = 1000, stratified: bool = False, low_discrepancy: bool = False):
        self.num_idx = num_idx
        self.stratified = stratified
        self.low_discrepancy = low_discrepancy

    def __call__(self, n: int, generator=None, device=None, rank=None, world_size=None) -> torch.Tensor:
        low, high = 0, self.num_idx
        if self.stratified:
            initialised = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
            world_size = (
                world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
            )
            if not 1 <= world_size <= self.num_idx:
                raise BadInput(f"world_size must be in 1..num_idx={self.num_idx}, got {world_size}")
            if not 0 <= rank < world_size:
                raise BadInput(f"rank must be in 0..world_size-1={world_size - 1}, got {rank}")
            low, high = rank * self.num_idx // world_size, (rank + 1) * self.num_idx // world_size
        # draw where the generator lives, then move
        gen_device = generator.device if generator is not None else device
        if not self.low_discrepancy:
            return torch.randint(low, high, (n,), generator=generator, device=gen_device).to(device)
        u = torch.rand((), generator=generator, device=gen_device, dtype=torch.float64)
        points = (torch.arange(n, device=gen_device, dtype=torch.float64) + u) / n  # in [0, 1)
        idx = low + (points * (high - low)).long().clamp_(max=high - low - 1)
        return idx[torch.randperm(n, generator=generator, device=gen_device)].to(device)
