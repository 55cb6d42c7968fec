"""LowResolutionVideo: the super-resolution condition (`lr_scale`), a conditioner embedder that outputs `concat`.

It reads a low-resolution clip (batch key `lr_video`, `B T 3 h w` in [-1, 1]), upsamples each frame bilinearly
by `lr_scale` and encodes it with the engine's first stage; the network concatenates the latents to x_t on the
channel axis. Training makes the clip from the batch's video (`downsample`, antialiased); sampling reads it
from `lr_video=<mp4>`. The same condition goes to both guidance branches (it is never dropped).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vdm.errors import BadInput

INPUT_KEY = "lr_video"


def downsample(video: torch.Tensor, lr_scale: int) -> torch.Tensor:
    """`B T C H W` frames, antialiased bilinear downsampling by `lr_scale`: the low-resolution clip."""
    B, T, C, H, W = video.shape
    if H % lr_scale or W % lr_scale:
        raise BadInput(f"lr_scale={lr_scale} must divide the frame size {H}x{W}")
    frames = rearrange(video, "b t c h w -> (b t) c h w")
    small = F.interpolate(frames, size=(H // lr_scale, W // lr_scale), mode="bilinear", align_corners=False,
                          antialias=True)
    return rearrange(small, "(b t) c h w -> b t c h w", b=B)


def upsample(video: torch.Tensor, lr_scale: int) -> torch.Tensor:
    """`B T C h w` frames, bilinear upsampling by `lr_scale` to the model's frame size."""
    B, T, C, h, w = video.shape
    frames = F.interpolate(rearrange(video, "b t c h w -> (b t) c h w"), size=(h * lr_scale, w * lr_scale),
                           mode="bilinear", align_corners=False)
    return rearrange(frames, "(b t) c h w -> b t c h w", b=B)


class LowResolutionVideo(nn.Module):
    """`lr_video` (B T 3 h w) -> latents (B T C H W) of its `lr_scale`-times upsampled frames, by `encode`
    (the engine's `encode_video`, held as a function: the first stage stays the engine's own module)."""

    output_key = "concat"
    is_trainable = False
    ucg_rate = 0.0

    def __init__(self, lr_scale: int, encode: Callable[[torch.Tensor], torch.Tensor], input_key: str = INPUT_KEY):
        super().__init__()
        self.lr_scale, self.input_key = int(lr_scale), input_key
        self.__dict__["encode"] = encode  # not a submodule: no second copy of the first stage's weights

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        if not isinstance(clip, torch.Tensor) or clip.ndim != 5:
            raise BadInput(f"{self.input_key} must be a B T C H W video tensor (lr_scale={self.lr_scale}), "
                           f"got {type(clip).__name__}")
        with torch.autocast(clip.device.type, enabled=False):  # the first stage runs as it does outside training
            return self.encode(upsample(clip, self.lr_scale))
