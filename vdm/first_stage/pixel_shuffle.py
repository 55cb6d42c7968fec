"""A parameter-free first stage for small experiments: lossless per-frame space-to-depth.

Each f×f pixel patch of every frame becomes f² channels of one latent pixel, so the "latent" has
C·f² channels and H/f × W/f pixels, and decode is the exact inverse (bitwise). Time is untouched.
"""

import torch
from einops import rearrange
from torch import nn

from vdm.errors import BadInput


class PixelShuffleStage(nn.Module):
    """encode: (B, C, T, H, W) -> (B, C·f², T, H/f, W/f); decode inverts it exactly."""

    def __init__(self, factor: int = 4, in_channels: int = 3):
        super().__init__()
        if factor < 1:
            raise BadInput(f"PixelShuffleStage factor={factor}; must be a positive integer")
        if in_channels < 1:
            raise BadInput(f"PixelShuffleStage in_channels={in_channels}; must be a positive integer")
        self.factor = factor
        self.in_channels = in_channels
        self.latent_channels = in_channels * factor**2
        self.spatial_compression = factor
        self.temporal_compression = 1

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Deterministic: `generator` (a posterior draw for first stages that sample one) is not used."""
        _, c, _, h, w = x.shape
        if c != self.in_channels:
            raise BadInput(
                f"PixelShuffleStage.encode got {c} channels; expected in_channels={self.in_channels}"
            )
        for name, size in (("height", h), ("width", w)):
            if size % self.factor:
                raise BadInput(
                    f"PixelShuffleStage.encode: {name} {size} is not divisible by factor {self.factor}"
                )
        # channel index = c·f² + p·f + q for the pixel at (h·f + p, w·f + q)
        return rearrange(x, "b c t (h p) (w q) -> b (c p q) t h w", p=self.factor, q=self.factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1] != self.latent_channels:
            raise BadInput(
                f"PixelShuffleStage.decode got {z.shape[1]} channels; expected latent_channels={self.latent_channels}"
            )
        return rearrange(z, "b (c p q) t h w -> b c t (h p) (w q)", p=self.factor, q=self.factor)
