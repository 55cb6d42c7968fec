"""First stages: map videos (B, C, T, H, W) to latents and back."""

from vdm.first_stage.cogvideox_vae import CogVideoXVAE
from vdm.first_stage.pixel_shuffle import PixelShuffleStage

__all__ = ["CogVideoXVAE", "PixelShuffleStage"]
