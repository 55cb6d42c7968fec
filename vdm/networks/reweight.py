"""Reweight (prompt-to-prompt style editing, SPEC §5): in the window, the target row of every
`SharePair` scales its post-softmax attention between video tokens and chosen text tokens.

The probabilities of the video->token columns and the token->video rows are multiplied by
`reweight_scale` without renormalising, then applied to V. During the first `share_kv_steps` steps
the target attends to its source's K/V (to inherit the source's layout), afterwards to its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vdm.errors import BadInput
from vdm.networks.attention_control import AttentionCall
from vdm.networks.kv_sharing import WindowedControl, as_token_idx, check_token_idx, source_rows
from vdm.networks.visualize import query_block


def reweighted_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_text_tokens: int,
                         token_idx: Sequence[int], scale: float, block: int | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√d) with P[video, token_idx] and P[token_idx, video] times `scale`, then @ v.

    q, k, v: (B, heads, N, d), tokens `[text | video]`. Exact, in float32, one row and one block of
    queries at a time: peak extra memory about heads·block·N float32 (heads·block·N <= LOGITS_BUDGET)
    plus one row's k and v in float32 (2·heads·N·d).
    """
    B, heads, N, d = q.shape
    block = block or query_block(heads, N)
    is_token = torch.zeros(N, dtype=torch.bool, device=q.device)
    is_token[list(token_idx)] = True
    is_video = torch.arange(N, device=q.device) >= num_text_tokens
    out = torch.empty_like(q)
    for b in range(B):
        k_b, v_b = k[b].float(), v[b].float()  # (heads, N, d)
        for start in range(0, N, block):
            stop = min(start + block, N)
            probs = torch.softmax(torch.matmul(q[b, :, start:stop].float(), k_b.transpose(-1, -2)) / math.sqrt(d),
                                  dim=-1)  # (heads, blk, N)
            boosted = ((is_video[start:stop, None] & is_token[None, :])
                       | (is_token[start:stop, None] & is_video[None, :]))  # (blk, N)
            probs.mul_(1 + (scale - 1) * boosted.float())
            out[b, :, start:stop] = torch.matmul(probs, v_b).to(out.dtype)
    return out


class Reweight(WindowedControl):
    """In the window, targets attend with reweighted probabilities (see `reweighted_attention`) to the
    source's K/V at steps < `share_kv_steps` and to their own afterwards; all other rows, and every row
    outside the window, get plain attention. With reweight_scale=1 this is KV-sharing at steps <
    share_kv_steps and plain attention after."""

    name = "reweight"

    def __init__(self, reweight_token_idx: int | Sequence[int], reweight_scale: float, start_step: int = 2,
                 end_step: int = 25, start_layer: int | None = None, end_layer: int | None = None,
                 step_idx: Sequence[int] | None = None, layer_idx: Sequence[int] | None = None,
                 share_kv_steps: int = 2):
        super().__init__(start_step, end_step, start_layer, end_layer, step_idx, layer_idx)
        self.reweight_token_idx = as_token_idx("reweight_token_idx", reweight_token_idx)
        self.reweight_scale = float(reweight_scale)
        if share_kv_steps < 0:
            raise BadInput(f"share_kv_steps={share_kv_steps} is negative; valid: 0 or more steps")
        self.share_kv_steps = int(share_kv_steps)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        check_token_idx("reweight_token_idx", self.reweight_token_idx, call.num_text_tokens)
        if not call.pairs or not self.active(call.step_idx, call.layer_idx, call.num_layers):
            return F.scaled_dot_product_attention(q, k, v)
        src = source_rows(q.shape[0], call.pairs, q.device)
        targets = torch.tensor([p.target for p in call.pairs], device=q.device)
        kv_rows = src[targets] if call.step_idx < self.share_kv_steps else targets
        out = torch.empty_like(q)
        others = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
        others[targets] = False
        if others.any():
            out[others] = F.scaled_dot_product_attention(q[others], k[others], v[others])
        out[targets] = reweighted_attention(q[targets], k[kv_rows], v[kv_rows], call.num_text_tokens,
                                            self.reweight_token_idx, self.reweight_scale)
        return out

    def __repr__(self) -> str:
        return (f"Reweight(reweight_token_idx={list(self.reweight_token_idx)}, reweight_scale={self.reweight_scale}, "
                f"share_kv_steps={self.share_kv_steps}, {self.window})")
