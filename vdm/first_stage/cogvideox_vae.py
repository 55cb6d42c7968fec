"""The CogVideoX 3D causal VAE, as a first stage over diffusers' `AutoencoderKLCogVideoX`.

Causal in time with temporal compression r: F = r·(T−1)+1 pixel frames <-> T latent frames (the
first frame is encoded on its own, every further r frames become one latent frame). Latents are
unscaled; the engine multiplies by its scale_factor.
"""

import inspect
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX
from torch import nn

from vdm.dtypes import resolve_dtype
from vdm.errors import BadInput, NotFound


def _check_vae_folder(folder: Path) -> None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise NotFound(
            f"CogVideoX VAE path '{folder}' has no config.json; expected a diffusers AutoencoderKLCogVideoX folder"
            " (config.json + weights), or the pipeline folder with subfolder='vae'"
        )
    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name != "AutoencoderKLCogVideoX":
        raise BadInput(
            f"CogVideoX VAE path '{folder}' holds a {class_name!r} config; expected _class_name 'AutoencoderKLCogVideoX'"
        )


def _vae_from_config(config: Mapping) -> AutoencoderKLCogVideoX:
    valid = set(inspect.signature(AutoencoderKLCogVideoX.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}  # drop _class_name etc.
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise BadInput(f"CogVideoX VAE config has unknown keys {unknown}; valid keys: {sorted(valid)}")
    return AutoencoderKLCogVideoX(**kwargs)


class CogVideoXVAE(nn.Module):
    """encode: (B, C, F, H, W) in [-1, 1] -> z (B, latent_channels, T, H/s, W/s); decode inverts it."""

    def __init__(
        self,
        path: str | Path | None = None,
        config: Mapping | None = None,
        subfolder: str | None = None,
        enable_tiling: bool = False,
        enable_slicing: bool = False,
        sample_posterior: bool = True,
        dtype: torch.dtype | str | None = None,
    ):
        super().__init__()
        if (path is None) == (config is None):
            raise BadInput(
                "CogVideoXVAE needs exactly one of path (a local diffusers folder) or config (a dict)"
            )
        dtype = resolve_dtype(dtype)
        if path is not None:
            folder = Path(path) / subfolder if subfolder else Path(path)
            if not folder.is_dir():
                raise NotFound(
                    f"CogVideoX VAE path '{folder}' does not exist; expected a local folder"
                )
            _check_vae_folder(folder)
            self.vae = AutoencoderKLCogVideoX.from_pretrained(
                str(path), subfolder=subfolder, local_files_only=True, torch_dtype=dtype
            )
            logging.getLogger(__name__).info("loaded CogVideoX VAE from %s", folder)
        else:
            self.vae = _vae_from_config(config)
            if dtype is not None:
                self.vae.to(dtype)
        if enable_tiling:
            self.vae.enable_tiling()
        if enable_slicing:
            self.vae.enable_slicing()
        self.sample_posterior = sample_posterior

        cfg = self.vae.config
        self.in_channels = cfg.in_channels
        self.latent_channels = cfg.latent_channels
        self.spatial_compression = 2 ** (len(cfg.block_out_channels) - 1)
        self.temporal_compression = int(cfg.temporal_compression_ratio)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _, c, frames, h, w = x.shape
        r = self.temporal_compression
        if c != self.in_channels:
            raise BadInput(f"CogVideoXVAE.encode got {c} channels; expected {self.in_channels}")
        if (frames - 1) % r:
            raise BadInput(
                f"CogVideoXVAE.encode got {frames} frames; the causal VAE takes r·k+1 frames with r={r}: "
                f"{', '.join(str(r * k + 1) for k in range(4))}, ..."
            )
        for name, size in (("height", h), ("width", w)):
            if size % self.spatial_compression:
                raise BadInput(
                    f"CogVideoXVAE.encode: {name} {size} is not divisible by spatial_compression {self.spatial_compression}"
                )
        posterior = self.vae.encode(x.to(self.dtype)).latent_dist
        return posterior.sample(generator=generator) if self.sample_posterior else posterior.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        _, c, latent_frames, _, _ = z.shape
        if c != self.latent_channels:
            raise BadInput(
                f"CogVideoXVAE.decode got {c} channels; expected latent_channels={self.latent_channels}"
            )
        # diffusers decodes the first 2 + T%2 latent frames together and only treats the first one as the
        # causal single frame when that count is odd: an even T gives r·T frames instead of r·(T−1)+1.
        if latent_frames > 1 and latent_frames % 2 == 0:
            raise BadInput(
                f"CogVideoXVAE.decode got {latent_frames} latent frames; the causal decoder needs an odd count "
                f"(1, 3, 5, ...) to return r·(T−1)+1 frames (an even T gives r·T)"
            )
        return self.vae.decode(z.to(self.dtype)).sample
