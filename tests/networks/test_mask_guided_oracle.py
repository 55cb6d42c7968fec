"""Mask-guided KV-sharing against an oracle: SPEC §5's bullet list transcribed with full attention matrices.

The oracle below shares no code with `vdm.networks.kv_sharing` / `visualize`: it builds every (N, N)
probability matrix, keeps a running sum of the video->text maps over the layers of one forward pass,
and writes each target row out of a foreground and a background attention whose masks are full (N, N)
matrices. Batch rows follow the CFG layout [uc_src, uc_tgt, c_src, c_tgt].
"""

import math

import pytest
import torch
import torch.nn.functional as F

from vdm.networks import AttentionCall, SharePair
from vdm.networks.kv_sharing import KVSharing, MaskGuidedKVSharing

HEADS, D, L = 2, 8, 4
PAIRS = (SharePair(0, 1, 2, 3), SharePair(2, 3, 2, 3))


def layer_inputs(num_layers, grid, seed):
    """Random q, k, v (4, HEADS, N, D) for every layer of one forward pass, in layer order."""
    T, H, W = grid
    g = torch.Generator().manual_seed(seed)
    n = L + T * H * W
    return [tuple(torch.randn(4, HEADS, n, D, generator=g, dtype=torch.float64) for _ in range(3))
            for _ in range(num_layers)]


def probabilities(q, k, bias=None):
    """softmax(q kᵀ/√d + bias) for one row: (heads, N, N)."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(D)
    return (logits if bias is None else logits + bias).softmax(-1)


def mask_of(mean_map, token_idx, grid, thres):
    """SPEC: sum over the text tokens, min-max per latent frame over its H×W tokens (+1e-6), >= thres."""
    T, H, W = grid
    m = sum(mean_map[:, j] for j in token_idx).reshape(T, H * W)
    out = torch.empty_like(m, dtype=torch.bool)
    for t in range(T):
        frame = m[t]
        out[t] = (frame - frame.min()) / (frame.max() - frame.min() + 1e-6) >= thres
    return out.reshape(-1)


def oracle_pass(inputs, grid, in_window, ref, cur, thres):
    """Outputs of every layer of one forward pass; `in_window(layer)` says whether the layer shares K/V."""
    n = inputs[0][0].shape[2]
    map_sum, count, outputs = None, 0, []
    for layer, (q, k, v) in enumerate(inputs):
        # FIRST: this layer's head-averaged video->text maps join the running sum (every layer)
        maps = torch.stack([probabilities(q[b], k[b]).mean(0)[L:, :L] for b in range(4)])
        map_sum, count = (maps, 1) if map_sum is None else (map_sum + maps, count + 1)
        out = torch.stack([probabilities(q[b], k[b]) @ v[b] for b in range(4)])
        if in_window(layer):
            mean = map_sum / count
            for pair in PAIRS:
                source_mask = mask_of(mean[pair.mask_source], ref, grid, thres)
                target_mask = mask_of(mean[pair.mask_target], cur, grid, thres)
                fg_bias = torch.zeros(n, n, dtype=q.dtype)
                bg_bias = torch.zeros(n, n, dtype=q.dtype)
                for i in range(L, n):  # video queries only; text queries stay unmasked
                    for j in range(L, n):
                        if not source_mask[j - L]:
                            fg_bias[i, j] = -math.inf
                        else:
                            bg_bias[i, j] = -math.inf
                q_t, k_s, v_s = q[pair.target], k[pair.source], v[pair.source]
                foreground = probabilities(q_t, k_s, fg_bias) @ v_s
                background = probabilities(q_t, k_s, bg_bias) @ v_s
                for i in range(n):
                    take_fg = (i in cur) if i < L else bool(target_mask[i - L])
                    out[pair.target, :, i] = (foreground if take_fg else background)[:, i]
        outputs.append(out)
    return outputs


def control_pass(control, inputs, grid, step, num_layers):
    scratch = {}
    return [control(q.float(), k.float(), v.float(), AttentionCall(layer, num_layers, L, grid, step, PAIRS, scratch))
            for layer, (q, k, v) in enumerate(inputs)]


CASES = [  # (grid, num_layers, window options, step, ref_token_idx, cur_token_idx, thres)
    ((2, 2, 2), 3, dict(step_idx=[0], layer_idx=[0]), 0, [1], [2], 0.3),
    ((2, 2, 3), 4, dict(step_idx=[3], layer_idx=[0, 2, 3]), 3, [0, 3], [1], 0.3),
    ((3, 2, 2), 4, dict(start_step=1, end_step=5, start_layer=2), 4, [2], [0, 2], 0.5),
    ((2, 3, 2), 5, dict(start_step=0, end_step=3, start_layer=1, end_layer=3), 2, [1, 2], [1, 2], 0.1),
    ((2, 2, 2), 4, dict(step_idx=[2], layer_idx=[1, 3]), 7, [0], [3], 0.3),  # step outside the window
]


@pytest.mark.parametrize("grid, num_layers, window, step, ref, cur, thres", CASES)
def test_every_layer_matches_the_spec_oracle(grid, num_layers, window, step, ref, cur, thres):
    control = MaskGuidedKVSharing(ref_token_idx=ref, cur_token_idx=cur, thres=thres, **window)
    for seed in range(3):
        inputs = layer_inputs(num_layers, grid, seed)
        expected = oracle_pass(inputs, grid, lambda layer: control.active(step, layer, num_layers), ref, cur, thres)
        actual = control_pass(control, inputs, grid, step, num_layers)
        for layer in range(num_layers):
            error = (actual[layer].double() - expected[layer]).abs().max().item()
            assert error <= 1e-5, f"layer {layer}, seed {seed}: max abs diff {error:.2e}"


def test_a_window_at_layer_zero_uses_its_own_maps():
    """The old 'no maps yet' fallback (plain KV-sharing) can never run: layer 0 already has its maps."""
    grid = (2, 2, 2)
    control = MaskGuidedKVSharing(ref_token_idx=[1], cur_token_idx=[2], step_idx=[0], layer_idx=[0])
    (q, k, v), = layer_inputs(1, grid, seed=11)
    call = AttentionCall(0, 1, L, grid, 0, PAIRS, {})
    out = control(q.float(), k.float(), v.float(), call)
    shared = KVSharing(step_idx=[0], layer_idx=[0])(q.float(), k.float(), v.float(), AttentionCall(0, 1, L, grid, 0, PAIRS))
    assert call.scratch[control.COUNT] == 1
    assert (out[[1, 3], :, L:] - shared[[1, 3], :, L:]).abs().max() > 1e-3
    expected, = oracle_pass([(q, k, v)], grid, lambda layer: True, [1], [2], 0.3)
    assert (out.double() - expected).abs().max() <= 1e-5


def test_text_rows_of_the_target_are_plain_attention_to_the_source():
    grid = (2, 2, 2)
    control = MaskGuidedKVSharing(ref_token_idx=[0, 1], cur_token_idx=[2], step_idx=[0], layer_idx=[1])
    inputs = [tuple(t.float() for t in qkv) for qkv in layer_inputs(2, grid, seed=12)]
    out = control_pass(control, inputs, grid, 0, 2)[1]
    q, k, v = inputs[1]
    for pair in PAIRS:
        s, t = pair.source, pair.target
        plain = F.scaled_dot_product_attention(q[t, :, :L], k[s], v[s])
        torch.testing.assert_close(out[t, :, :L], plain, atol=1e-6, rtol=1e-5)
        # the old behaviour applied the per-key masks to text queries too: it would differ here
        ms = pair.mask_source
        maps = sum(probabilities(q_l[ms], k_l[ms]).mean(0)[L:, :L] for q_l, k_l, _ in inputs) / 2  # layers 0, 1
        source_mask = mask_of(maps, [0, 1], grid, 0.3)
        assert 0 < source_mask.sum() < source_mask.numel()
        keep = torch.cat([torch.ones(L, dtype=torch.bool), source_mask])
        old_fg = F.scaled_dot_product_attention(q[t, :, :L], k[s], v[s], attn_mask=keep)
        old_bg = F.scaled_dot_product_attention(q[t, :, :L], k[s], v[s], attn_mask=~keep | (torch.arange(len(keep)) < L))
        old = torch.where((torch.arange(L) == 2)[None, :, None], old_fg, old_bg)
        assert (old - plain).abs().max() > 1e-3
