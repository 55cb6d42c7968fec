import pytest
import torch

from vdm.diffusion import DiscreteTimestepSampler


def test_uniform_covers_all_indices():
    idx = DiscreteTimestepSampler(1000)(100_000, generator=torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64 and idx.shape == (100_000,)
    assert idx.unique().tolist() == list(range(1000))


@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_stratified_ranks_draw_from_their_slice(world_size):
    sampler = DiscreteTimestepSampler(1000, stratified=True)
    covered = set()
    for rank in range(world_size):
        idx = sampler(20_000, generator=torch.Generator().manual_seed(rank), rank=rank, world_size=world_size)
        low, high = rank * 1000 // world_size, (rank + 1) * 1000 // world_size
        assert idx.min().item() == low and idx.max().item() == high - 1
        covered |= set(idx.tolist())
    assert covered == set(range(1000))


def test_stratified_defaults_to_single_process():
    idx = DiscreteTimestepSampler(1000, stratified=True)(50_000, generator=torch.Generator().manual_seed(0))
    assert idx.min().item() == 0 and idx.max().item() == 999


def test_generator_makes_draws_reproducible():
    sampler = DiscreteTimestepSampler(1000)
    a = sampler(16, generator=torch.Generator().manual_seed(5))
    b = sampler(16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_bad_rank():
    with pytest.raises(ValueError, match="rank must be in 0..world_size-1=1"):
        DiscreteTimestepSampler(1000, stratified=True)(4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be in 1..num_idx=10"):
        DiscreteTimestepSampler(10, stratified=True)(4, rank=0, world_size=11)


def test_low_discrepancy_batches_are_evenly_spaced_and_uniform_overall():
    sampler = DiscreteTimestepSampler(1000, low_discrepancy=True)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(1000)
    for _ in range(2000):
        idx = sampler(16, generator=generator)
        gaps = idx.sort().values.diff()
        # evenly spaced: 1000/16 = 62.5 apart, so every gap is 62 or 63 (plain uniform draws bunch up)
        assert set(gaps.tolist()) <= {62, 63}
        counts += torch.bincount(idx, minlength=1000)
    # each index is equally likely: 32 draws expected per index; a binomial's 6-sigma band
    assert counts.min() > 32 - 6 * 32**0.5 and counts.max() < 32 + 6 * 32**0.5
    # the order within a batch is shuffled, not sorted
    assert not torch.equal(idx, idx.sort().values)


def test_low_discrepancy_within_a_rank_slice():
    sampler = DiscreteTimestepSampler(1000, stratified=True, low_discrepancy=True)
    idx = sampler(10, generator=torch.Generator().manual_seed(1), rank=1, world_size=4)
    assert idx.min() >= 250 and idx.max() < 500
    assert set(idx.sort().values.diff().tolist()) <= {25}
