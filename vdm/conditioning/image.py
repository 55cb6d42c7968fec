"""Image-to-video conditioning (CogVideoX-5B-I2V, CogVideoX1.5-5B-I2V): the image latent as a `concat` entry.

The image (`read_image`: RGB, resized to the video's size with PIL's Lanczos filter when it differs, as diffusers'
VideoProcessor does, then scaled to [-1, 1]) is VAE-encoded as a 1-frame video and its posterior sampled from
the video's seeded generator before the initial noise is drawn (`VideoDiffusionEngine.encode_image`). Its latent
is scaled by the model's rule (`IMAGE_SCALES`) and laid out over the sampled latent frames by `layout`: the
image latent first, zeros after. On CogVideoX 1.5 the first sampled frame is the padding one that is dropped
before decoding, so the image latent sits beside it, as diffusers' CogVideoXImageToVideoPipeline builds it (its
count of frames grows by the padding before the image latents are laid out). `ImageLatents`, the conditioner's embedder, hands the laid-out latents
(batch key `image_latents`) to the network as `concat`, the same for both guidance branches.

Training (SAT's `noised_image_input`, CogVideo's I2V fine-tuning): the image is the clip's first frame with
Gaussian noise of a per-sample σ = exp(N(−3, 0.5)) added in pixel space (`noise_first_frame`), encoded and
scaled the same way, and laid out over the clip's latent frames; `ImageLatents(ucg_rate=0.05)` drops a
sample's image latent to zeros (SAT's `noised_image_dropout`; per sample here, per batch in SAT, the same at
SAT's batch size 1). Sampling never drops it: the unconditional branch takes the image too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from vdm.errors import BadInput, NotFound

INPUT_KEY = "image_latents"
FIRST_FRAME_KEY = "first_frame_latent"  # vdm.precompute's noised first-frame latent, unscaled (C, 1, h, w)
# How the image latent is scaled: 1.0 multiplies by the VAE's scaling factor; 1.5's VAE config says
# invert_scale_latents (diffusers divides: "the CogVideoX team forgot to multiply the scaling factor during
# training"); SAT's 1.5 sampling leaves it unscaled.
IMAGE_SCALES = ("scale", "invert", "none")
# SAT's add_noise_to_first_frame: log σ ~ N(mean, std), per sample.
FIRST_FRAME_LOG_SIGMA = (-3.0, 0.5)


def scale_image_latent(z: torch.Tensor, scale_factor: float, rule: str) -> torch.Tensor:
    if rule not in IMAGE_SCALES:
        raise BadInput(f"image_latent_scale={rule!r}; valid: {', '.join(IMAGE_SCALES)}")
    return z * scale_factor if rule == "scale" else z / scale_factor if rule == "invert" else z


def layout(image_latent: torch.Tensor, sampled_frames: int) -> torch.Tensor:
    """(B, 1, C, h, w) image latents -> (B, sampled_frames, C, h, w): the image latent, then zeros."""
    B, one, C, h, w = image_latent.shape
    if one != 1:
        raise BadInput(f"an image latent has one frame; got {one}")
    return torch.cat([image_latent, image_latent.new_zeros(B, sampled_frames - 1, C, h, w)], dim=1)


def noise_first_frame(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) frames in [-1, 1] plus Gaussian noise of σ = exp(N(−3, 0.5)) drawn per sample (not
    clamped, as SAT leaves it)."""
    mean, std = FIRST_FRAME_LOG_SIGMA
    kwargs = {"generator": generator, "device": image.device}
    log_sigma = torch.randn(image.shape[0], **kwargs) * std + mean
    noise = torch.randn(image.shape, **kwargs, dtype=image.dtype)
    return image + noise * log_sigma.exp().to(image.dtype).view(-1, 1, 1, 1)


def read_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file as (1, 3, height, width) in [-1, 1]: RGB, Lanczos-resized when its size differs."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"image={path}: no such file (give a .png or .jpg)")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise BadInput(f"image={path}: not a readable image ({err})") from None
    if img.size != (width, height):
        img = img.resize((width, height), resample=Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels * 2 - 1)[None]


class ImageLatents(nn.Module):
    """`image_latents` (B, T, C, h, w), laid out by `layout`, as the `concat` condition. In training a sample's
    image latent becomes zeros with probability `ucg_rate` (its input is replaced by `ucg_value`, so sampling's
    unconditional branch keeps the image: only zeroed embeddings are zeroed there)."""

    output_key = "concat"
    is_trainable = False
    ucg_value = 0.0

    def __init__(self, input_key: str = INPUT_KEY, ucg_rate: float = 0.0):
        super().__init__()
        self.input_key, self.ucg_rate = input_key, float(ucg_rate)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
            raise BadInput(f"{self.input_key} must be B T C H W image latents (vdm.conditioning.image.layout), "
                           f"got {type(latents).__name__}")
        return latents
