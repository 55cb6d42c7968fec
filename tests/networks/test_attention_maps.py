"""Attention maps of the visualisation control (the reference's VisualizeAdaLNMixin) against full matrices.

Tiny case: 2 heads, 3 text tokens, a 3x2x3 latent grid, head dim 4. The expected maps come from the
whole (N, N) probability matrix of every row, built directly here.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vdm.networks import AttentionCall, SharePair
from vdm.networks.visualize import (
    REFERENCE_MAP_LAYERS,
    REFERENCE_MAP_STEPS,
    VisualizeAttention,
    attention_maps,
)

HEADS, L, GRID, D = 2, 3, (3, 2, 3), 4
T, H, W = GRID
N = L + T * H * W


def qkv(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, HEADS, N, D, generator=g) for _ in range(3)]


def full_probs(q, k):
    """(B, N, N) head-averaged softmax(q kᵀ/√d), the whole matrix."""
    return (q @ k.transpose(-1, -2) / math.sqrt(D)).softmax(-1).mean(1)


def video(t, h, w):
    return L + t * H * W + h * W + w


def expected_maps(q, k, frames, positions):
    P = full_probs(q, k)
    spatial = torch.stack([torch.stack([P[b, video(f, 0, 0):video(f + 1, 0, 0), video(f, 0, 0):video(f + 1, 0, 0)]
                                        for f in frames]) for b in range(q.shape[0])])
    temporal = torch.stack([torch.stack([P[b][[video(t, h, w) for t in range(T)]][:, [video(t, h, w) for t in range(T)]]
                                         for h, w in positions]) for b in range(q.shape[0])])
    return dict(video_text=P[:, L:, :L], text_text=P[:, :L, :L], spatial=spatial, temporal=temporal)


def normalised(x):
    return (x - x.min()) / (x.max() - x.min() + 1e-6)


def read_png(path):
    image = Image.open(path)
    return torch.tensor(list(image.getdata()), dtype=torch.float).view(image.size[1], image.size[0]) / 255


def assert_png(path, expected):
    image = read_png(path)
    assert image.shape == expected.shape
    assert (image - expected).abs().max() <= 0.5 / 255 + 1e-5


# -- the maps -----------------------------------------------------------------------------------------

def test_chunked_maps_equal_the_full_matrix_for_every_block_size(monkeypatch):
    q, k, _ = qkv(seed=1)
    frames, positions = (0, 2), ((1, 2), (0, 0))
    expected = expected_maps(q, k, frames, positions)
    seen = []
    logsumexp = torch.logsumexp
    monkeypatch.setattr(torch, "logsumexp", lambda x, *a, **kw: seen.append(tuple(x.shape)) or logsumexp(x, *a, **kw))
    for block in (1, 4, 7, N):
        seen.clear()
        maps = attention_maps(q, k, L, GRID, frames, positions, block=block).tensors()
        assert {name: tuple(t.shape) for name, t in maps.items()} == {
            "video_text": (2, T * H * W, L), "text_text": (2, L, L), "spatial": (2, 2, H * W, H * W),
            "temporal": (2, 2, T, T)}
        for name, tensor in maps.items():
            assert (tensor - expected[name]).abs().max() < 1e-6, name
        assert seen and all(s[0] == HEADS and s[1] <= block and s[2] == N for s in seen)  # one row, one block


# -- the control --------------------------------------------------------------------------------------

def at(step, layer, num_layers=3, scratch=None, pairs=()):
    return AttentionCall(layer, num_layers, L, GRID, step, pairs, {} if scratch is None else scratch)


def run_pass(control, inputs, step, pairs=()):
    scratch = {}
    return [control(q, k, v, at(step, layer, len(inputs), scratch, pairs)) for layer, (q, k, v) in enumerate(inputs)]


def test_visualize_writes_the_layer_mean_maps_of_a_single_prompt_batch(tmp_path):
    inputs = [qkv(seed=s) for s in (2, 3, 4)]  # one forward pass of three layers, batch [uc, c], no pairs
    control = VisualizeAttention(tmp_path, attn_map_step_idx=[1], attn_map_layer_idx=[0, 2])
    outs = run_pass(control, inputs, step=1)
    for out, (q, k, v) in zip(outs, inputs):
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))

    folder = tmp_path / "step001_pass0"
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        [f"layer{layer:02d}_row{b}_video_text_token{j:03d}.png" for layer in (0, 2) for b in range(2) for j in range(L)]
        + [f"layer{layer:02d}_row{b}_{kind}.png" for layer in (0, 2) for b in range(2)
           for kind in ("text_text", "spatial_frame01", "temporal_h01_w01")])  # middle frame, centre token

    for layer, used in ((0, inputs[:1]), (2, inputs)):
        mean = {name: sum(expected_maps(q, k, [T // 2], [(H // 2, W // 2)])[name] for q, k, _ in used) / len(used)
                for name in ("video_text", "text_text", "spatial", "temporal")}
        for b in range(2):
            prefix = folder / f"layer{layer:02d}_row{b}"
            for j in range(L):
                per_frame = torch.stack([normalised(m) for m in mean["video_text"][b, :, j].view(T, H, W)])
                assert_png(f"{prefix}_video_text_token{j:03d}.png", per_frame.permute(1, 0, 2).reshape(H, T * W))
            assert_png(f"{prefix}_text_text.png", normalised(mean["text_text"][b]))
            assert_png(f"{prefix}_spatial_frame01.png", normalised(mean["spatial"][b, 0]))
            assert_png(f"{prefix}_temporal_h01_w01.png", normalised(mean["temporal"][b, 0]))
    assert Image.open(folder / "layer00_row0_video_text_token000.png").size == (T * W, H)
    assert Image.open(folder / "layer00_row0_spatial_frame01.png").size == (H * W, H * W)
    assert Image.open(folder / "layer00_row0_temporal_h01_w01.png").size == (T, T)


def test_visualize_token_groups_frames_and_positions(tmp_path):
    inputs = [qkv(B=4, seed=5)]
    pairs = (SharePair(0, 1, 2, 3), SharePair(2, 3, 2, 3))  # a multi-prompt batch: pairs change nothing
    control = VisualizeAttention(tmp_path, step_idx=[0], layer_idx=[0], token_idx=[0, 2], frame_idx=[0, 2],
                                 positions=[[0, 1], [1, 2]])
    (out,) = run_pass(control, inputs, step=0, pairs=pairs)
    q, k, v = inputs[0]
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    folder = tmp_path / "step000_pass0"
    assert sorted(p.name for p in folder.iterdir() if "row3" in p.name) == [
        "layer00_row3_spatial_frame00.png", "layer00_row3_spatial_frame02.png", "layer00_row3_temporal_h00_w01.png",
        "layer00_row3_temporal_h01_w02.png", "layer00_row3_text_text.png", "layer00_row3_video_text_tokens0-2.png"]
    summed = full_probs(q, k)[3, L:][:, [0, 2]].sum(-1).view(T, H, W)
    assert_png(folder / "layer00_row3_video_text_tokens0-2.png",
               torch.stack([normalised(m) for m in summed]).permute(1, 0, 2).reshape(H, T * W))
    spatial = expected_maps(q, k, [2], [(1, 2)])
    assert_png(folder / "layer00_row3_spatial_frame02.png", normalised(spatial["spatial"][3, 0]))
    assert_png(folder / "layer00_row3_temporal_h01_w02.png", normalised(spatial["temporal"][3, 0]))


def test_visualize_sums_only_at_chosen_steps_and_up_to_the_last_chosen_layer(tmp_path):
    q, k, v = qkv(seed=6)
    control = VisualizeAttention(tmp_path, attn_map_step_idx=[1], attn_map_layer_idx=[1])
    for call in (at(step=0, layer=0), at(step=None, layer=0), at(step=1, layer=2)):
        control(q, k, v, call)
        assert call.scratch == {}
    kept = at(step=1, layer=0)
    control(q, k, v, kept)
    assert kept.scratch[control.COUNT] == 1
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    second = {}  # another forward pass of the same step writes into its own folder
    control(q, k, v, at(step=1, layer=1, scratch=second))
    control(q, k, v, at(step=1, layer=1, scratch={}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step001_pass0", "step001_pass1"]
    assert second[control.DIR] == tmp_path / "step001_pass0"


def test_visualize_on_expand_reindexes_every_sum():
    q, k, v = qkv(seed=7)
    control = VisualizeAttention("unused", attn_map_step_idx=[0], attn_map_layer_idx=[5])
    scratch = {}
    control(q, k, v, at(step=0, layer=0, num_layers=6, scratch=scratch))
    before = scratch[control.SUM].tensors()
    control.on_expand(scratch, torch.tensor([0, 0, 1, 1]))
    for name, tensor in scratch[control.SUM].tensors().items():
        assert torch.equal(tensor, before[name][[0, 0, 1, 1]])


def test_visualize_defaults_and_aliases():
    control = VisualizeAttention("unused")
    assert (control.steps, control.layers) == (REFERENCE_MAP_STEPS, REFERENCE_MAP_LAYERS)
    assert REFERENCE_MAP_STEPS == (4, 14, 24, 34, 44, 49) and REFERENCE_MAP_LAYERS == (4, 14, 24, 29)
    control.validate(30, 50)
    aliased = VisualizeAttention("unused", step_idx=[3], layer_idx=[2, 5])
    assert (aliased.steps, aliased.layers) == ((3,), (2, 5))
    assert VisualizeAttention("unused", [3], [2, 5]).layers == (2, 5)
    # with both, the alias is the reference's KV-sharing window key (one job passes it to every control)
    both = VisualizeAttention("unused", attn_map_step_idx=[1], attn_map_layer_idx=[0], step_idx=[2], layer_idx=[3])
    assert (both.steps, both.layers) == ((1,), (0,))
    with pytest.raises(ValueError, match="attn_map_layer_idx is empty"):
        VisualizeAttention("unused", attn_map_layer_idx=[])
    with pytest.raises(ValueError, match=r"attn_map_layer_idx=\[14, 24, 29\] is outside the network's 8 layers \(valid 0..7\)"):
        control.validate(8, 50)


@pytest.mark.parametrize("options, message", [
    (dict(frame_idx=[3]), r"frame_idx=\[3\] is outside the 3 latent frames \(valid 0..2\)"),
    (dict(positions=[[2, 0]]), r"positions=\[\[2, 0\]\] is outside the 2x3 token grid"),
    (dict(token_idx=3), r"token_idx=\[3\] is outside the 3 text tokens \(valid 0..2\)"),
])
def test_visualize_options_outside_the_grid_are_one_line_errors(options, message):
    q, k, v = qkv()
    control = VisualizeAttention("unused", [0], [0], **options)
    with pytest.raises(ValueError, match=message) as err:
        control(q, k, v, at(step=0, layer=0))
    assert "\n" not in str(err.value)
