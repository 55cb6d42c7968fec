"""Video->text attention maps: computed exactly in query blocks, saved as PNG strips, and a control
(`VisualizeAttention`) that writes them at chosen steps and layers without changing any output.

A map is the head-averaged softmax(q kᵀ/√d) of the video queries, restricted to the text keys:
(B, N_video, L_text). The softmax runs over ALL keys, so each query needs its whole row of logits;
the maps are therefore computed one batch row and one block of queries at a time, and only the
text columns of each block are kept.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from vdm.networks.attention_control import AttentionCall, AttentionControl

log = logging.getLogger(__name__)

# Largest block of float32 logits (heads x queries x keys) held at once by the chunked computations.
LOGITS_BUDGET = 2**26  # elements: 256 MiB


def query_block(heads: int, num_keys: int) -> int:
    """Queries per block so that one row's (heads, block, keys) logits stay within LOGITS_BUDGET."""
    return max(1, LOGITS_BUDGET // (heads * num_keys))


@torch.no_grad()
def video_text_maps(q: torch.Tensor, k: torch.Tensor, num_text_tokens: int, block: int | None = None) -> torch.Tensor:
    """Head-averaged video->text attention probabilities, (B, N_video, L_text) in float32.

    q, k: (B, heads, N, d) with tokens `[text | video]`. Exact: each query block's logits against all
    keys give its log-normaliser; only the text columns are exponentiated and kept. Peak extra memory
    per block: about 2·heads·block·N float32 (logits and logsumexp's work space) plus one row's k in
    float32 (heads·N·d).
    """
    B, heads, N, d = q.shape
    L = num_text_tokens
    block = block or query_block(heads, N)
    maps = q.new_empty(B, N - L, L, dtype=torch.float32)
    for b in range(B):
        k_b = k[b].float()  # (heads, N, d)
        for start in range(L, N, block):
            q_blk = q[b, :, start:start + block].float()  # (heads, blk, d)
            logits = torch.matmul(q_blk, k_b.transpose(-1, -2)) / math.sqrt(d)  # (heads, blk, N)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            maps[b, start - L:start - L + q_blk.shape[1]] = (logits[..., :L] - lse).exp().mean(0)
    return maps


def save_frames(path: str | Path, frames: torch.Tensor, normalise: bool = True) -> None:
    """Write (T, H, W) frames side by side as one greyscale PNG (min-max normalised if asked)."""
    strip = rearrange(frames.detach().float().cpu(), "t h w -> h (t w)")
    if normalise:
        strip = (strip - strip.min()) / (strip.max() - strip.min() + 1e-12)
    pixels = (strip.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)


class VisualizeAttention(AttentionControl):
    """Plain attention; at the chosen (step, layer) pairs, save every row's video->text maps as PNGs.

    `token_idx=None`: one image per text token; an int or a list: one image of the map summed over
    those tokens. Files: `out_dir/step{s}_layer{l}_row{b}_token{j}.png` (or `_tokens{i}-{j}-...`), the
    latent frames side by side, min-max normalised. The output is never changed.
    """

    name = "visualize"

    def __init__(self, out_dir: str | Path, step_idx: list[int], layer_idx: list[int],
                 token_idx: int | list[int] | None = None):
        self.out_dir = Path(out_dir)
        self.step_idx = tuple(int(s) for s in step_idx)
        self.layer_idx = tuple(int(i) for i in layer_idx)
        if isinstance(token_idx, int):
            token_idx = [token_idx]
        self.token_idx = None if token_idx is None else tuple(int(j) for j in token_idx)
        if self.token_idx == ():
            raise ValueError("token_idx is empty; give text token indices, or None for one image per token")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if call.step_idx in self.step_idx and call.layer_idx in self.layer_idx:
            self.save(q, k, call)
        return F.scaled_dot_product_attention(q, k, v)

    def save(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall) -> None:
        L = call.num_text_tokens
        if self.token_idx is not None and not all(0 <= j < L for j in self.token_idx):
            raise ValueError(f"token_idx={list(self.token_idx)} is outside the {L} text tokens (valid 0..{L - 1})")
        T, H, W = call.video_grid
        maps = rearrange(video_text_maps(q, k, L), "b (t h w) l -> b l t h w", t=T, h=H, w=W)
        prefix = f"step{call.step_idx:03d}_layer{call.layer_idx:02d}"
        for b in range(maps.shape[0]):
            if self.token_idx is None:
                for j in range(L):
                    save_frames(self.out_dir / f"{prefix}_row{b}_token{j:03d}.png", maps[b, j])
            else:
                tokens = "-".join(str(j) for j in self.token_idx)
                save_frames(self.out_dir / f"{prefix}_row{b}_tokens{tokens}.png", maps[b, list(self.token_idx)].sum(0))
        log.debug("saved video->text attention maps of step %s layer %s to %s", call.step_idx, call.layer_idx,
                  self.out_dir)

    def validate(self, num_layers: int, num_steps: int) -> None:
        bad_layers = [i for i in self.layer_idx if not 0 <= i < num_layers]
        if bad_layers:
            raise ValueError(f"layer_idx={bad_layers} is outside the network's {num_layers} layers "
                             f"(valid 0..{num_layers - 1})")
        bad_steps = [s for s in self.step_idx if not 0 <= s < num_steps]
        if bad_steps:
            raise ValueError(f"step_idx={bad_steps} is outside the sampler's {num_steps} steps "
                             f"(valid 0..{num_steps - 1})")

    def __repr__(self) -> str:
        return (f"VisualizeAttention(out_dir={str(self.out_dir)!r}, step_idx={list(self.step_idx)}, "
                f"layer_idx={list(self.layer_idx)}, token_idx={self.token_idx and list(self.token_idx)})")
