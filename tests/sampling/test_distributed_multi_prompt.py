"""One long multi-prompt video split over 2 gloo processes on the CPU: its latents equal one process's for
every control, with reuse=true and reuse=false, and the work really is shared; with its tokens split over the
2 processes (Ulysses, `sequence=`) instead of its segment passes, likewise for every control that does not read
the attention of all heads."""

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import TINY_NETWORK
from vdm.build import build_engine, compose
from vdm.diffusion.multi_prompt import long_latent_frames, plan_segments
from vdm.distributed import Processes
from vdm.networks.caches import FirstBlockCache

PROMPTS = ["a red square moving right", "a red square moving down", "a blue circle moving left"]
CACHED = 1.0  # first_block's threshold: skips some of the 6 steps of each pass, computes others
WINDOW = {"start_step": 1, "end_step": 4}  # of 6 steps: steps inside and outside; layers: the scaled default
CONTROLS = {
    "base": {},
    "kv_sharing": WINDOW,
    "mask_guided": {**WINDOW, "ref_token_idx": [2], "cur_token_idx": [2], "thres": 0.3},
    "mask_guided_saved": {**WINDOW, "ref_token_idx": [2], "cur_token_idx": [2], "thres": 0.3},  # + save_masks_dir
    "reweight": {**WINDOW, "reweight_token_idx": 2, "reweight_scale": 2.0},
}


def engine():
    torch.manual_seed(0)
    engine = build_engine(compose(TINY_NETWORK + [
        "sampler.verbose=false", "network.num_layers=4", "sampler.num_steps=6", "network.sample_frames=5",
        "sampler_multi_prompt.overlap_size=3", "sampler_multi_prompt.num_transition_blocks=1"])).eval()
    with torch.no_grad():  # off the zero init, where attention has no effect on the output
        for p in engine.network.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return engine


def sample_all(engine, processes: Processes, masks: Path, sequence: Processes | None = None) -> dict:
    """Every control with reuse true and false: {name: (latent, layer evaluations of this process)}; with
    `sequence` (token shards), the controls that see only the attention of their own heads."""
    conds, ucs = zip(*(engine.conditioning({"txt": [p]}) for p in PROMPTS))
    frames = long_latent_frames(len(plan_segments(3, 1)), 5, 3)
    randn = torch.randn(1, frames, 48, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, options in CONTROLS.items():
        if sequence is not None and name.startswith("mask_guided"):
            continue
        control = {"mask_guided": "kv_sharing_mask_guided", "mask_guided_saved": "kv_sharing_mask_guided"}.get(name, name)
        saved = {"save_masks_dir": str(masks / name)} if name == "mask_guided_saved" else {}
        control = engine.switch_adaln_layer(control, **options, **saved)
        for reuse in (False, True):
            stats = {}
            sampler = replace(engine.sampler_multi_prompt, reuse=reuse, processes=processes)
            latent = engine.sample_multi_prompt(list(conds), list(ucs), randn, sampler=sampler, stats=stats,
                                                generator=torch.Generator().manual_seed(1), control=control,
                                                sequence=sequence)
            out[f"{name}/reuse={reuse}"] = (latent, stats.get("layer_evaluations", 0))
    for name, reuse in (("base", True), ("kv_sharing", False)):  # a first-block cache per segment pass
        control = engine.switch_adaln_layer(name, **CONTROLS[name])
        stats = {}
        sampler = replace(engine.sampler_multi_prompt, reuse=reuse, processes=processes)
        group = sequence or Processes()
        latent = engine.sample_multi_prompt(list(conds), list(ucs), randn, sampler=sampler, stats=stats,
                                            generator=torch.Generator().manual_seed(1), control=control,
                                            sequence=sequence, cache=partial(FirstBlockCache, 4, CACHED, group))
        out[f"{name}/reuse={reuse}/first_block"] = (latent, stats["cache"])
    return out


def worker(rank: int, folder: str, shards: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        if shards:  # every pass on both processes, each with half its tokens
            out = sample_all(engine(), Processes(), Path(folder) / "masks_split", sequence=Processes(rank, 2))
        else:
            out = sample_all(engine(), Processes(rank, 2), Path(folder) / "masks_split")
        torch.save(out, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_single_process_latents(tmp_path):
    # fork: the workers start with the modules already imported (each sets one thread, as DataLoader workers do)
    mp.start_processes(worker, args=(str(tmp_path),), nprocs=2, join=True, start_method="fork")
    single = sample_all(engine(), Processes(), tmp_path / "masks_single")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, (latent, evaluations) in single.items():
        (z0, ev0), (z1, ev1) = ranks[0][key], ranks[1][key]
        assert torch.equal(z0, z1), key  # every process holds the same latent
        torch.testing.assert_close(z0, latent, rtol=0, atol=1e-5, msg=key)
        if key.endswith("first_block"):  # each pass decided alone, wherever it ran: the same totals
            assert ev0 == ev1 == evaluations and 0 < evaluations["computed_steps"] < evaluations["steps"], key
        elif key.startswith("mask_guided_saved"):  # saves images: one process runs every pass
            assert (ev0, ev1) == (evaluations, 0), key
        else:  # the work is shared: each process does part of it, together at least all of it
            assert 0 < ev1 < evaluations and 0 < ev0 < evaluations and ev0 + ev1 >= evaluations, key
    assert not torch.allclose(single["base/reuse=True"][0], single["kv_sharing/reuse=True"][0], atol=1e-4)
    assert not torch.allclose(single["kv_sharing/reuse=True"][0], single["mask_guided/reuse=True"][0], atol=1e-4)

    def pngs(root: Path) -> dict:
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.png"))}

    split, alone = pngs(tmp_path / "masks_split"), pngs(tmp_path / "masks_single")
    assert split and split.keys() == alone.keys() and split == alone


def test_two_token_shards_give_the_single_process_latents(tmp_path):
    mp.start_processes(worker, args=(str(tmp_path), True), nprocs=2, join=True, start_method="fork")
    single = sample_all(engine(), Processes(), tmp_path / "masks_single", sequence=Processes())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert single.keys() == ranks[0].keys() and len(single) == 8  # base, kv_sharing, reweight; reuse false / true
    for key, (latent, evaluations) in single.items():
        (z0, ev0), (z1, ev1) = ranks[0][key], ranks[1][key]
        assert torch.equal(z0, z1), key  # every process holds the whole latent
        torch.testing.assert_close(z0, latent, rtol=0, atol=1e-5, msg=key)
        assert ev0 == ev1 == evaluations, key  # every pass on both, on half the tokens


def test_a_zero_threshold_cache_per_segment_pass_gives_the_uncached_latents():
    e = engine()
    conds, ucs = zip(*(e.conditioning({"txt": [p]}) for p in PROMPTS))
    frames = long_latent_frames(len(plan_segments(3, 1)), 5, 3)
    randn = torch.randn(1, frames, 48, 8, 8, generator=torch.Generator().manual_seed(0))
    for name, reuse in (("base", True), ("kv_sharing", False)):
        sampler = replace(e.sampler_multi_prompt, reuse=reuse)
        control = e.switch_adaln_layer(name, **CONTROLS[name])
        plain, cached = (e.sample_multi_prompt(list(conds), list(ucs), randn, sampler=sampler, control=control,
                                               generator=torch.Generator().manual_seed(1), **extra)
                         for extra in ({}, {"cache": partial(FirstBlockCache, 4, 0.0)}))
        if reuse:  # with a cache each segment is a pass of its own (uncached: one batch), the same sums rounded apart
            torch.testing.assert_close(cached, plain, rtol=0, atol=1e-5, msg=name)
        else:  # the same passes: bit for bit
            assert torch.equal(plain, cached), name


def test_a_cache_under_a_kv_sharing_window_with_reuse_is_refused():
    import pytest

    e = engine()
    conds, ucs = zip(*(e.conditioning({"txt": [p]}) for p in PROMPTS))
    randn = torch.randn(1, long_latent_frames(len(plan_segments(3, 1)), 5, 3), 48, 8, 8)
    with pytest.raises(ValueError, match=r"a step cache on a multi-prompt video under kv_sharing needs reuse=false"):
        e.sample_multi_prompt(list(conds), list(ucs), randn, control=e.switch_adaln_layer("kv_sharing", **WINDOW),
                              cache=partial(FirstBlockCache, 4, 0.1))
