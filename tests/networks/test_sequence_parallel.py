"""Ulysses sequence parallelism (vdm.networks.sequence_parallel) on two gloo processes: the DiT's output on token
shards equals one process's within 1e-5 in float32, for a 2B-like network (sin-cos positions), a 5B-like one
(RoPE) and a 1.5-like one (RoPE, 2-frame tokens), with uneven shards (odd token counts), with a KV-sharing
control and an expanded batch, and under a first-block cache whose decisions, read on shards, are one
process's."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vdm.distributed import Processes
from vdm.networks.attention_control import CallContext, Expand, SharePair
from vdm.networks.caches import FirstBlockCache
from vdm.networks.dit import DiffusionTransformer
from vdm.networks.kv_sharing import KVSharing

SMALL = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
             text_embed_dim=24, num_layers=3, sample_width=6, sample_height=6, sample_frames=9, patch_size=2,
             max_text_seq_length=7)
VARIANTS = {
    "2b": {},
    "5b": dict(use_rotary_positional_embeddings=True),
    "1.5": dict(use_rotary_positional_embeddings=True, patch_size_t=2),
}


def network(variant: str) -> DiffusionTransformer:
    torch.manual_seed(0)
    net = DiffusionTransformer(**SMALL, **VARIANTS[variant])
    with torch.no_grad():  # away from the identity initialisation: every block does something
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


def inputs(variant: str, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    frames = 2 if variant == "1.5" else 3  # 3 x 3 x 3 = 27 video tokens and 7 text: odd counts, uneven shards
    x = torch.randn(batch, frames, 4, 6, 6, generator=g)
    return x, torch.randn(batch, 7, 24, generator=g), torch.tensor([700] * batch)


def contexts(group=None):
    """(name, ctx maker) pairs: plain, KV-sharing with pairs over an expanded batch."""
    pairs = (SharePair(0, 1, 0, 1), SharePair(2, 3, 2, 3))
    share = KVSharing(start_step=0, end_step=4, start_layer=0, end_layer=3)
    return [("plain", lambda: CallContext(group=group)),
            ("kv_sharing", lambda: CallContext(share, pairs, Expand(1, torch.tensor([0, 0, 1, 1])), group=group))]


def outputs(group=None) -> dict:
    """Every case's output (on one process when `group` is None)."""
    out = {}
    with torch.inference_mode():
        for variant in VARIANTS:
            net = network(variant)
            x, text, t = inputs(variant)
            for name, ctx in contexts(group):
                out[variant, name] = net(x, t, text, step_idx=0, ctx=ctx())
            cache = FirstBlockCache(3, threshold=0.02, group=group)
            steps = []
            # a cache's steps: the near ones (relative change ~0.005) are skipped, the far one (~1.5) is not
            for i, (timestep, scale) in enumerate(((900, 1.0), (900, 0.99), (900, 0.98), (500, 0.5))):
                ts = torch.tensor([timestep] * 2)
                steps.append(net(x * scale, ts, text, step_idx=i, ctx=CallContext(cache=cache, group=group)))
            out[variant, "first_block"] = torch.stack(steps)
            out[variant, "first_block_steps"] = torch.tensor(cache.steps)
    return out


def worker(rank: int, world: int, init: str, result: str):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        out = outputs(Processes(rank, world))
        if rank == 0:
            torch.save(out, result)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("ulysses")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(2, f"file://{root / 'init'}", str(root / "out.pt")), nprocs=2)
    return torch.load(root / "out.pt")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", ["plain", "kv_sharing", "first_block"])
def test_two_token_shards_give_one_process_output(sharded, variant, case):
    one = outputs_one()
    a, b = one[variant, case], sharded[variant, case]
    assert a.shape == b.shape
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5
    if case == "first_block":  # the same steps skipped, and some were
        assert torch.equal(one[variant, "first_block_steps"], sharded[variant, "first_block_steps"])
        assert not one[variant, "first_block_steps"].all() and one[variant, "first_block_steps"].any()


_ONE = {}


def outputs_one() -> dict:
    if not _ONE:
        _ONE.update(outputs())
    return _ONE


def test_heads_not_divisible_is_refused():
    from vdm.networks.sequence_parallel import SequenceShards

    with pytest.raises(ValueError, match=r"ulysses=3 does not divide the network's 4 attention heads"):
        SequenceShards(Processes(0, 3), 7, 27, 4)
