"""Where CogVideoX's tokens sit and how latents become tokens: the timestep embedding, the fixed 3D sin-cos
positions (2B), 3D RoPE (5B and later; `slice` grids for 1.5), and the patch embedding with its inverse
(`PatchEmbed`: 1.0's per-frame Conv2d, 1.5's linear embedding of 2-frame patches). Used by
`vdm.networks.dit.DiffusionTransformer`; the formulas follow diffusers' `embeddings.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

if TYPE_CHECKING:
    from vdm.networks.dit import DiTConfig


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / (half - shift))
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    return F.pad(emb, (0, dim % 2))


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(n,) positions -> (n, dim) as [sin | cos] with frequencies 1/10000^(i/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_3d(dim: int, t: int, h: int, w: int, spatial_scale: float, temporal_scale: float) -> torch.Tensor:
    """CogVideoX-2B fixed positions for a (t, h, w) token grid -> (t·h·w, dim).

    A quarter of the channels encode time, three quarters space (half width, half height, width first).
    """
    dim_t, dim_s = dim // 4, 3 * dim // 4
    grid_w = (torch.arange(w, dtype=torch.float64) / spatial_scale).repeat(h)  # (h·w,), w fastest
    grid_h = (torch.arange(h, dtype=torch.float64) / spatial_scale).repeat_interleave(w)
    spatial = torch.cat([sincos_1d(dim_s // 2, grid_w), sincos_1d(dim_s // 2, grid_h)], dim=1)  # (h·w, dim_s)
    temporal = sincos_1d(dim_t, torch.arange(t, dtype=torch.float64) / temporal_scale)  # (t, dim_t)
    pos = torch.cat([temporal[:, None].expand(t, h * w, dim_t), spatial[None].expand(t, h * w, dim_s)], dim=-1)
    return pos.reshape(t * h * w, dim).float()


def _rope_axis(dim: int, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """(n,) positions -> (n, dim) angles, each frequency repeated twice (interleaved pairs)."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim)
    return torch.outer(positions.float(), freqs).repeat_interleave(2, dim=1)


def rope_3d(head_dim: int, t: int, h: int, w: int, base_h: int, base_w: int,
            grid_type: str = "linspace") -> tuple[torch.Tensor, torch.Tensor]:
    """CogVideoX 3D RoPE angles for a (t, h, w) token grid -> (cos, sin), each (t·h·w, head_dim).

    `linspace` (1.0, 5B): a grid smaller than (or shaped unlike) the base grid is placed on the base grid's
    resize-crop region, as diffusers' CogVideoXPipeline does, so spatial positions stay comparable.
    `slice` (1.5): integer positions 0..h−1, 0..w−1 (the top-left slice of the base grid), time 0..t−1.
    """
    pos_t = torch.arange(t, dtype=torch.float32)
    if grid_type == "slice":
        pos_h, pos_w = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    else:
        if h / w > base_h / base_w:
            rh, rw = base_h, int(round(base_h / h * w))
        else:
            rh, rw = int(round(base_w / w * h)), base_w
        top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
        pos_h = torch.linspace(top, (top + rh) * (h - 1) / h, h)
        pos_w = torch.linspace(left, (left + rw) * (w - 1) / w, w)
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    angles = torch.cat([
        _rope_axis(dim_t, pos_t)[:, None, None].expand(t, h, w, dim_t),
        _rope_axis(dim_hw, pos_h)[None, :, None].expand(t, h, w, dim_hw),
        _rope_axis(dim_hw, pos_w)[None, None, :].expand(t, h, w, dim_hw),
    ], dim=-1).reshape(t * h * w, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (B, heads, N, d) by the angles (N, d)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Patch embedding
# --------------------------------------------------------------------------------------------------




@dataclass(frozen=True)
class TokenGrid:
    """The token layout of one forward pass: `text` text tokens, then the video's (t, h, w) grid of patches."""

    text: int
    t: int
    h: int
    w: int

    @property
    def video(self) -> tuple[int, int, int]:
        return self.t, self.h, self.w


class PatchEmbed(nn.Module):
    """Video latents -> tokens, and back (`unpatchify`); text -> width D. CogVideoX 1.0: a per-frame Conv2d
    (kernel = stride = p). 1.5 (`patch_size_t`): pt adjacent latent frames and a p x p patch per token, features
    ordered (C, pt, ph, pw), through a linear layer with bias."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        c, p, d = config, config.patch_size, config.hidden_size
        self.patch_size, self.patch_size_t = p, c.patch_size_t
        if c.patch_size_t is None:
            self.proj = nn.Conv2d(c.in_channels, d, kernel_size=p, stride=p, bias=c.patch_bias)
        else:
            self.proj = nn.Linear(c.in_channels * p * p * c.patch_size_t, d)
        self.text_proj = nn.Linear(c.text_embed_dim, d)
        if c.use_learned_positional_embeddings:
            num_patches = c.max_latent_frames * (c.sample_height // p) * (c.sample_width // p)
            self.pos_embedding = nn.Parameter(torch.zeros(1, c.max_text_seq_length + num_patches, d))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, TokenGrid]:
        """(text (B, L, D), video (B, t·h·w, D), their grid) of `B T C H W` latents and `B L E` text."""
        B, T, _, H, W = x.shape
        p, pt = self.patch_size, self.patch_size_t
        if pt is None:
            video = self.proj(rearrange(x, "b t c h w -> (b t) c h w"))
            video = rearrange(video, "(b t) d h w -> b (t h w) d", b=B)
        else:
            video = self.proj(rearrange(x, "b (t pt) c (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=p, pw=p))
        grid = TokenGrid(context.shape[1], T // (pt or 1), H // p, W // p)
        return self.text_proj(context), video, grid

    def unpatchify(self, tokens: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """Video tokens (B, t·h·w, [pt·]p·p·C) -> latents `B t[·pt] C (h·p) (w·p)`."""
        p, pt = self.patch_size, self.patch_size_t or 1
        return rearrange(tokens, "b (t h w) (c pt ph pw) -> b (t pt) c (h ph) (w pw)", t=grid.t, h=grid.h,
                         w=grid.w, pt=pt, ph=p, pw=p)
