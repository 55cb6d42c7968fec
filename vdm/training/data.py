"""A resumable, rank-sharded stream of batches over any map-style dataset.

The stream is a sequence of global positions 0, 1, 2, ...; position p reads item perm_e[p mod N] of
epoch e = p // N, with perm_e a permutation seeded by (seed, e). Each optimizer step consumes
`batch_size · world_size` positions (rank r takes its own slice), so a run resumed at a data
position sees exactly the batches it would have seen without stopping.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vdm.errors import BadInput


class StreamSampler(Sampler[int]):
    def __init__(self, dataset_len: int, batch_size: int, start: int = 0, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if dataset_len < 1:
            raise BadInput("the dataset is empty: nothing to train on")
        self.n, self.batch_size, self.start, self.seed = dataset_len, batch_size, start, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self._perm: tuple[int, torch.Tensor] | None = None

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if not self.shuffle:
            return offset
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][offset])

    def __iter__(self) -> Iterator[int]:
        position = self.start
        per_step = self.batch_size * self.world_size
        while True:
            base = position + self.rank * self.batch_size
            for j in range(self.batch_size):
                yield self.index(base + j)
            position += per_step


def batch_stream(dataset: Dataset, batch_size: int, start: int = 0, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0) -> DataLoader:
    sampler = StreamSampler(len(dataset), batch_size, start, seed, rank, world_size)
    # its own generator: creating the iterator must not draw from the global RNG, whose state is
    # part of a checkpoint (a resumed run creates its iterator at another point of that stream)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                      generator=generator)
