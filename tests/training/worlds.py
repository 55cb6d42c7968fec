"""Test data and loss: the synthetic world with each item's index, or with NaN video at chosen items, and
a loss whose noise and timestep are functions of the item, so that runs over different numbers of
processes draw the same ones."""

import torch

from vdm.data.synthetic import SyntheticWorld
from vdm.diffusion import VideoDiffusionLoss


class IndexedWorld(SyntheticWorld):
    def __getitem__(self, index: int) -> dict:
        return {**super().__getitem__(index), "index": index}


class PoisonedWorld(SyntheticWorld):
    """Items in `bad_items` are all-NaN video."""

    def __init__(self, bad_items=(), **kwargs):
        super().__init__(**kwargs)
        self.bad_items = set(bad_items)

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        if index in self.bad_items:
            item["mp4"] = torch.full_like(item["mp4"], float("nan"))
        return item


class SeededVideoLoss(VideoDiffusionLoss):
    """VideoDiffusionLoss with each sample's timestep and noise drawn from a generator seeded by its index."""

    def __call__(self, network, denoiser, conditioner, x0, batch, noise=None, idx=None):
        generators = [torch.Generator().manual_seed(int(i)) for i in batch["index"]]
        idx = torch.stack([torch.randint(0, 1000, (), generator=g) for g in generators])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(x0.device)
        return super().__call__(network, denoiser, conditioner, x0, batch, noise=noise, idx=idx)
