"""DiTCtrl attention controls: KV-sharing, mask-guided sharing, reweight, visualisation, windows, registry.

Tiny case throughout: batch rows [uc_src, uc_tgt, c_src, c_tgt], 2 heads, 3 text tokens + a 2x2x2 video
grid, head dim 4; the expected outputs are written out with explicit matmuls.
"""

import math

import pytest
import torch
from PIL import Image

from vdm.networks import CONTROLS, AttentionCall, DiffusionTransformer, SharePair, make_control
from vdm.networks.attention_control import CallContext, Expand
from vdm.networks.kv_sharing import KVSharing, MaskGuidedKVSharing, Window
from vdm.networks.reweight import Reweight, reweighted_attention
from vdm.networks.visualize import VisualizeAttention, video_text_maps

HEADS, L, GRID, D = 2, 3, (2, 2, 2), 4
N = L + 8
PAIRS = (SharePair(0, 1, 2, 3), SharePair(2, 3, 2, 3))
TARGET_OF = {1: 0, 3: 2}  # target row -> source row


def qkv(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, HEADS, N, D, generator=g) for _ in range(3)]


def at(step=5, layer=29, num_layers=30, pairs=PAIRS, scratch=None) -> AttentionCall:
    return AttentionCall(layer, num_layers, L, GRID, step, pairs, {} if scratch is None else scratch)


def attend(q, k, v, keep_keys=None):
    """softmax(q kᵀ/√d) v by hand for one row (heads, N, d); `keep_keys` (N,) blocks the other keys."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(D)
    if keep_keys is not None:
        logits = logits.masked_fill(~keep_keys, float("-inf"))
    return logits.softmax(-1) @ v


def plain(q, k, v):
    return torch.stack([attend(q[b], k[b], v[b]) for b in range(q.shape[0])])


def naive_maps(q, k):
    probs = (q @ k.transpose(-1, -2) / math.sqrt(D)).softmax(-1).mean(1)  # (B, N, N)
    return probs[:, L:, :L]


def binary_mask(video_map, token_idx, thres):
    """(N_video, L) map -> (N_video,) bool, by hand: sum tokens, min-max per frame, >= thres."""
    m = video_map[:, token_idx].sum(-1).view(GRID[0], -1)
    m = (m - m.min(1, keepdim=True).values) / (m.max(1, keepdim=True).values - m.min(1, keepdim=True).values + 1e-6)
    return (m >= thres).flatten()


def fg_bg_expected(q, k, v, maps, ref, cur, thres):
    """Mask-guided output by hand from mean maps (B, N_video, L): the source's key masks apply to the
    target's video queries only; its text queries get plain attention to the source's K/V."""
    expected = plain(q, k, v)
    for pair in PAIRS:
        src_mask = binary_mask(maps[pair.mask_source], ref, thres)
        tgt_mask = binary_mask(maps[pair.mask_target], cur, thres)
        text = torch.ones(L, dtype=torch.bool)
        s, t = pair.source, pair.target
        fg = attend(q[t], k[s], v[s], torch.cat([text, src_mask]))
        bg = attend(q[t], k[s], v[s], torch.cat([text, ~src_mask]))
        expected[t, :, L:] = torch.where(tgt_mask[None, :, None], fg[:, L:], bg[:, L:])
        expected[t, :, :L] = attend(q[t], k[s], v[s])[:, :L]
    return expected


# -- KV-sharing ---------------------------------------------------------------------------------------

def test_kv_sharing_targets_attend_to_source_kv_in_the_window_only():
    q, k, v = qkv()
    control = KVSharing()  # steps 2..25, layers 25..30 of 30
    out = control(q, k, v, at(step=5, layer=29))
    for row in range(4):
        src = TARGET_OF.get(row, row)
        torch.testing.assert_close(out[row], attend(q[row], k[src], v[src]), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out[1], attend(q[1], k[1], v[1]), atol=1e-3)
    for outside in (at(step=1, layer=29), at(step=25, layer=29), at(step=5, layer=24), at(step=None),
                    at(step=5, layer=29, pairs=())):
        torch.testing.assert_close(control(q, k, v, outside), plain(q, k, v), atol=1e-6, rtol=1e-5)


# -- mask-guided --------------------------------------------------------------------------------------

def test_mask_guided_first_window_layer_uses_its_own_maps():
    q, k, v = qkv()
    control = MaskGuidedKVSharing(ref_token_idx=[1], cur_token_idx=[2])
    assert control.thres == 0.3  # the reference's inference.yaml
    scratch = {}
    out = control(q, k, v, at(layer=25, scratch=scratch))
    torch.testing.assert_close(scratch[control.SUM], naive_maps(q, k), atol=1e-6, rtol=1e-5)
    assert scratch[control.COUNT] == 1
    torch.testing.assert_close(out, fg_bg_expected(q, k, v, naive_maps(q, k), [1], [2], 0.3), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out, KVSharing()(q, k, v, at(layer=25)), atol=1e-3)


def test_mask_guided_sums_only_maps_a_window_layer_of_the_pass_reads():
    q, k, v = qkv()
    control = MaskGuidedKVSharing(ref_token_idx=[1], cur_token_idx=[2], layer_idx=[28])
    before = {}
    torch.testing.assert_close(control(q, k, v, at(layer=3, scratch=before)), plain(q, k, v), atol=1e-6, rtol=1e-5)
    assert before[control.COUNT] == 1  # a layer before the window: its maps join the mean
    for unread in (at(layer=29), at(step=1, layer=3), at(step=None, layer=3)):
        control(q, k, v, unread)
        assert unread.scratch == {}  # after the last window layer, or outside the steps: nothing to keep


def test_mask_guided_selects_foreground_and_background_by_known_masks(monkeypatch):
    q, k, v = qkv(seed=1)
    maps = torch.rand(4, 8, L, generator=torch.Generator().manual_seed(2)) * 0.1
    maps[2, :, 0] = 0.05  # constant per frame: summing it in leaves the normalised source mask unchanged
    maps[2, :, 1] = torch.tensor([0.9, 0.1, 0.1, 0.5, 0.2, 0.2, 0.8, 0.2])  # source mask 1001 0010 at 0.3
    maps[3, :, 2] = torch.tensor([0.1, 0.7, 0.7, 0.1, 0.3, 0.3, 0.3, 0.9])  # target mask 0110 0001
    control = MaskGuidedKVSharing(ref_token_idx=[0, 1], cur_token_idx=[2], thres=0.3)
    own = maps.clone()  # this layer's own maps
    monkeypatch.setattr("vdm.networks.kv_sharing.video_text_maps", lambda *args: own)
    scratch = {control.SUM: 2 * maps, control.COUNT: 2}  # two earlier layers with the same maps: mean = maps
    out = control(q, k, v, at(layer=27, scratch=scratch))
    assert scratch[control.COUNT] == 3
    assert binary_mask(maps[2], [0, 1], 0.3).tolist() == [1, 0, 0, 1, 0, 0, 1, 0]
    assert binary_mask(maps[3], [2], 0.3).tolist() == [0, 1, 1, 0, 0, 0, 0, 1]
    expected = fg_bg_expected(q, k, v, maps, [0, 1], [2], 0.3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out, KVSharing()(q, k, v, at(layer=27)), atol=1e-3)


def test_mask_guided_over_two_layers_uses_the_mean_of_both_layers_maps():
    (q0, k0, v0), (q1, k1, v1) = qkv(seed=3), qkv(seed=4)
    control = MaskGuidedKVSharing(ref_token_idx=[1], cur_token_idx=[0, 2], thres=0.4, step_idx=[5], layer_idx=[1])
    scratch = {}
    out0 = control(q0, k0, v0, at(layer=0, num_layers=2, scratch=scratch))
    out1 = control(q1, k1, v1, at(layer=1, num_layers=2, scratch=scratch))
    torch.testing.assert_close(out0, plain(q0, k0, v0), atol=1e-6, rtol=1e-5)
    expected = fg_bg_expected(q1, k1, v1, (naive_maps(q0, k0) + naive_maps(q1, k1)) / 2, [1], [0, 2], 0.4)
    torch.testing.assert_close(out1, expected, atol=1e-5, rtol=1e-4)


def test_on_expand_reindexes_the_running_sum():
    control = MaskGuidedKVSharing(ref_token_idx=[1], cur_token_idx=[2])
    maps = torch.rand(2, 8, L)
    scratch = {control.SUM: maps.clone(), control.COUNT: 3}
    control.on_expand(scratch, torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(scratch[control.SUM], maps[[0, 0, 1, 1]])
    assert scratch[control.COUNT] == 3


def test_mask_guided_through_the_network_with_expand_equals_the_duplicated_batch():
    torch.manual_seed(0)
    model = DiffusionTransformer(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                 time_embed_dim=24, text_embed_dim=20, num_layers=3, sample_width=8,
                                 sample_height=8, sample_frames=9, max_text_seq_length=6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 3, 4, 8, 8, generator=g), torch.tensor([3, 900]), torch.randn(2, 6, 20, generator=g)
    rows = torch.tensor([0, 0, 1, 1])
    control = MaskGuidedKVSharing(ref_token_idx=[0], cur_token_idx=[1], thres=0.3, step_idx=[0], layer_idx=[2])
    with torch.no_grad():
        expanded = model(x, t, c, step_idx=0, ctx=CallContext(control, PAIRS, Expand(1, rows)))
        duplicated = model(x[rows], t[rows], c[rows], step_idx=0, ctx=CallContext(control, PAIRS))
        unshared = model(x[rows], t[rows], c[rows], step_idx=0)
    torch.testing.assert_close(expanded, duplicated, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(duplicated[[1, 3]], unshared[[1, 3]], atol=1e-4)


# -- chunked maps -------------------------------------------------------------------------------------

def test_chunked_maps_equal_the_naive_maps_and_hold_one_query_block(monkeypatch):
    q, k, _ = qkv(B=2, seed=5)
    expected = naive_maps(q, k)
    seen = []
    logsumexp = torch.logsumexp

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return logsumexp(x, *args, **kwargs)

    monkeypatch.setattr(torch, "logsumexp", spy)
    for block in (1, 3, N):
        seen.clear()
        maps = video_text_maps(q, k, L, block=block)
        assert maps.shape == (2, N - L, L)
        assert (maps - expected).abs().max() < 1e-6
        assert seen and all(s[0] == HEADS and s[1] <= block and s[2] == N for s in seen)  # one row, one block


# -- reweight -----------------------------------------------------------------------------------------

def test_reweight_with_scale_one_is_plain_after_the_shared_steps_and_kv_sharing_before():
    q, k, v = qkv(seed=6)
    control = Reweight(reweight_token_idx=1, reweight_scale=1.0, start_step=0)
    torch.testing.assert_close(control(q, k, v, at(step=2)), plain(q, k, v), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(control(q, k, v, at(step=1)), KVSharing(start_step=0)(q, k, v, at(step=1)),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("step", [0, 7])
def test_reweight_scales_probabilities_between_video_and_the_token(step):
    q, k, v = qkv(seed=7)
    idx, scale = [0, 2], 3.0
    out = Reweight(reweight_token_idx=idx, reweight_scale=scale, start_step=0)(q, k, v, at(step=step))
    for row in range(4):
        if row not in TARGET_OF:
            torch.testing.assert_close(out[row], attend(q[row], k[row], v[row]), atol=1e-6, rtol=1e-5)
            continue
        kv = TARGET_OF[row] if step < 2 else row
        probs = (q[row] @ k[kv].transpose(-1, -2) / math.sqrt(D)).softmax(-1)
        probs[:, L:, idx] *= scale
        probs[:, idx, L:] *= scale
        torch.testing.assert_close(out[row], probs @ v[kv], atol=1e-6, rtol=1e-5)


def test_reweighted_attention_is_the_same_for_every_block_size(monkeypatch):
    q, k, v = qkv(B=2, seed=8)
    reference = reweighted_attention(q, k, v, L, [1], -2.0, block=N)
    seen = []
    softmax = torch.softmax
    monkeypatch.setattr(torch, "softmax", lambda x, *a, **kw: seen.append(tuple(x.shape)) or softmax(x, *a, **kw))
    for block in (1, 3):
        seen.clear()
        torch.testing.assert_close(reweighted_attention(q, k, v, L, [1], -2.0, block=block), reference,
                                   atol=1e-6, rtol=1e-5)
        assert seen and all(s[0] == HEADS and s[1] <= block for s in seen)


# -- windows ------------------------------------------------------------------------------------------

def test_window_default_layers_scale_with_depth_and_lists_replace_ranges():
    assert list(Window().layers(30)) == [25, 26, 27, 28, 29]
    assert list(Window().layers(8)) == [7]
    assert list(Window().layers(2)) == [1]
    w = Window()
    assert w.active(2, 25, 30) and w.active(24, 29, 30)
    assert not w.active(1, 25, 30) and not w.active(25, 25, 30) and not w.active(2, 24, 30)
    assert not w.active(None, 29, 30)
    explicit = Window(step_idx=[1, 3], layer_idx=[0, 2])
    assert explicit.active(3, 2) and explicit.active(1, 0)
    assert not explicit.active(2, 2) and not explicit.active(3, 1)
    assert Window(start_layer=4).active(3, 100)  # end_layer=None needs no depth
    with pytest.raises(ValueError, match="start_layer=None .* pass num_layers"):
        Window().active(3, 25)


@pytest.mark.parametrize("window, message", [
    (Window(end_layer=40), r"end_layer=40 is outside the network's 30 layers \(valid 1..30\)"),
    (Window(start_layer=30), r"start_layer=30 is outside the network's 30 layers \(valid 0..29\)"),
    (Window(layer_idx=[3, 31]), r"layer_idx=\[31\] is outside the network's 30 layers \(valid 0..29\)"),
    (Window(end_layer=10), r"end_layer=10 must be above start_layer=25"),
    (Window(end_step=60), r"end_step=60 is outside the sampler's 50 steps \(valid 1..50\)"),
    (Window(start_step=50, end_step=51), r"start_step=50 is outside the sampler's 50 steps \(valid 0..49\)"),
    (Window(step_idx=[-1, 4]), r"step_idx=\[-1\] is outside the sampler's 50 steps \(valid 0..49\)"),
])
def test_window_validate_names_the_option_and_the_valid_range(window, message):
    with pytest.raises(ValueError, match=message) as err:
        window.validate(30, 50)
    assert "\n" not in str(err.value)


def test_controls_validate_their_windows():
    with pytest.raises(ValueError, match=r"end_layer=40 .* \(valid 1..30\)"):
        make_control("kv_sharing", end_layer=40).validate(30, 50)
    with pytest.raises(ValueError, match=r"end_step=25 .* 20 steps"):
        make_control("reweight", reweight_token_idx=1, reweight_scale=2).validate(30, 20)
    with pytest.raises(ValueError, match=r"layer_idx=\[30\]"):
        make_control("visualize", out_dir="unused", step_idx=[1], layer_idx=[30]).validate(30, 50)
    make_control("kv_sharing_mask_guided", ref_token_idx=1, cur_token_idx=2).validate(30, 50)
    with pytest.raises(ValueError, match="step window start_step=5, end_step=5 is empty"):
        KVSharing(start_step=5, end_step=5)


# -- determinism, registry, token checks --------------------------------------------------------------

def test_controls_are_stateless_between_calls():
    q, k, v = qkv(seed=9)
    for control in (KVSharing(), Reweight(1, -2.0),
                    MaskGuidedKVSharing(ref_token_idx=[1], cur_token_idx=[2], layer_idx=[28, 29])):
        before = repr(control), dict(vars(control))
        outs = []
        for _ in range(2):
            scratch = {}
            outs.append(torch.stack([control(q, k, v, at(layer=layer, scratch=scratch)) for layer in (27, 28, 29)]))
        assert torch.equal(outs[0], outs[1])
        assert (repr(control), dict(vars(control))) == before


OPTIONS = {
    "kv_sharing": {}, "KVSharingAdaLNMixin": {},
    "kv_sharing_mask_guided": dict(ref_token_idx=[1], cur_token_idx=[2]),
    "KVSharingMaskGuidedAdaLNMixin": dict(ref_token_idx=[1], cur_token_idx=[2]),
    "reweight": dict(reweight_token_idx=1, reweight_scale=-5),
    "ReWeightAdaLNMixin": dict(reweight_token_idx=1, reweight_scale=-5),
    "visualize": dict(out_dir="unused", step_idx=[1], layer_idx=[2]),
    "base": {}, "BaseAdaLNMixin": {},
}


def test_every_registered_name_and_alias_builds():
    assert set(OPTIONS) == set(CONTROLS)
    for name, options in OPTIONS.items():
        assert type(make_control(name, **options)) is CONTROLS[name]
    assert CONTROLS["KVSharingMaskGuidedAdaLNMixin"] is MaskGuidedKVSharing
    assert CONTROLS["ReWeightAdaLNMixin"] is Reweight
    with pytest.raises(ValueError, match="'kv_share' is unknown; valid names: base, BaseAdaLNMixin, kv_sharing") as err:
        make_control("kv_share")
    assert all(name in str(err.value) for name in CONTROLS)


OUT_OF_RANGE = r"is outside the 3 text tokens \(valid 0..2\)"


@pytest.mark.parametrize("control, message", [
    (MaskGuidedKVSharing(ref_token_idx=[5], cur_token_idx=[0]), r"ref_token_idx=\[5\] " + OUT_OF_RANGE),
    (MaskGuidedKVSharing(ref_token_idx=[0], cur_token_idx=[1, 3]), r"cur_token_idx=\[1, 3\] " + OUT_OF_RANGE),
    (Reweight(reweight_token_idx=3, reweight_scale=2), r"reweight_token_idx=\[3\] " + OUT_OF_RANGE),
    (VisualizeAttention("unused", [5], [29], token_idx=[7]), r"token_idx=\[7\] " + OUT_OF_RANGE),
])
def test_token_index_out_of_range_is_a_one_line_error(control, message):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=message) as err:
        control(q, k, v, at())
    assert "\n" not in str(err.value)


# -- mask images --------------------------------------------------------------------------------------

def test_mask_guided_saves_the_continuous_normalised_maps(tmp_path):
    q, k, v = qkv()
    control = MaskGuidedKVSharing(ref_token_idx=[1], cur_token_idx=[0, 2], layer_idx=[28, 29],
                                  save_masks_dir=tmp_path)
    scratch = {}
    for layer in (27, 28, 29):
        control(q, k, v, at(layer=layer, scratch=scratch))
    folder = tmp_path / "step005_pass0"
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
    assert sorted(p.name for p in folder.iterdir()) == [
        f"layer{layer}_pair{i}_{role}.png" for layer in (28, 29) for i in range(2) for role in ("source", "target")]
    T, H, W = GRID
    mean = naive_maps(q, k)  # the same q, k at layers 27..29: every mean equals one layer's maps
    for i, pair in enumerate(PAIRS):
        for role, row, tokens in (("source", pair.mask_source, [1]), ("target", pair.mask_target, [0, 2])):
            m = mean[row][:, tokens].sum(-1).view(T, H * W)
            low, high = m.min(1, keepdim=True).values, m.max(1, keepdim=True).values
            continuous = ((m - low) / (high - low + 1e-6)).view(T, H, W)
            image = torch.tensor(list(Image.open(folder / f"layer28_pair{i}_{role}.png").getdata()), dtype=torch.float)
            assert Image.open(folder / f"layer28_pair{i}_{role}.png").size == (T * W, H)
            strip = continuous.permute(1, 0, 2).reshape(H, T * W).flatten()  # frames side by side
            assert (image / 255 - strip).abs().max() <= 0.5 / 255 + 1e-6
            assert len(set(image.tolist())) > 2  # grey levels, not a binary mask

    second = {}  # another pass of the same step (the next segment pair) gets its own folder
    control(q, k, v, at(layer=28, scratch=second))
    assert second[control.DIR] == tmp_path / "step005_pass1"
