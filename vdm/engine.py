"""VideoDiffusionEngine: the network, its denoiser, conditioner, first stage, loss and samplers in one module.

The seed's SATVideoDiffusionEngine, as a plain `nn.Module` built from already-constructed parts
(see `vdm.build.build_engine` for the Hydra edge). Layout conventions: the batch holds video as
`B T C H W` in [-1, 1]; first stages see `B C T H W`; the network sees latents `B T C H W`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from functools import partial

import torch
import torch.nn as nn
from einops import rearrange

from vdm.conditioning.image import (
    FIRST_FRAME_KEY,
    ImageLatents,
    layout,
    noise_first_frame,
    scale_image_latent,
)
from vdm.conditioning.image import INPUT_KEY as IMAGE_KEY
from vdm.conditioning.low_resolution import INPUT_KEY as LOW_RESOLUTION_KEY
from vdm.conditioning.low_resolution import LowResolutionVideo, downsample, upsample
from vdm.diffusion.denoiser import DiscreteDenoiser
from vdm.diffusion.inversion import invert_ddim
from vdm.diffusion.multi_prompt import check_tiles
from vdm.diffusion.samplers import GuidedDenoiser, VideoDDIMSampler
from vdm.errors import BadInput
from vdm.networks.attention_control import AttentionControl, CallContext
from vdm.networks.controls import make_control
from vdm.networks.wrapper import NetworkWrapper

log = logging.getLogger(__name__)


def _no_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for a frozen module's `train()`: it stays in eval mode."""
    return self


def _is_text(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def is_lora_parameter(name: str) -> bool:
    return "lora_" in name


def network_in_channels(latent_channels: int, lr_scale: int | None, image_to_video: bool = False) -> int:
    """The network's input channels: the noisy latent, and concatenated on the channel axis the upsampled
    low-resolution latent (`lr_scale`) and the image latent (`image_to_video`)."""
    return latent_channels * (1 + bool(lr_scale) + bool(image_to_video))


class VideoDiffusionEngine(nn.Module):
    """Training and sampling for latent video diffusion (CogVideoX / DiTCtrl semantics, SPEC §1).

    Args:
        network: the DiT (`vdm.networks.DiffusionTransformer`) or any module with its signature.
        denoiser: `vdm.diffusion.DiscreteDenoiser`.
        conditioner: `vdm.conditioning.GeneralConditioner`.
        first_stage: a frozen autoencoder with `encode`/`decode` on `B C T H W`.
        loss_fn: `vdm.diffusion.VideoDiffusionLoss`.
        sampler_single: the default sampler (VPSDE-DPM++(2M) in CogVideoX).
        sampler_ddim: the DDIM sampler (editing, inversion, quick checks); optional.
        input_key: batch key of the video (or of precomputed latents when `latent_input`).
        log_keys: conditioning keys rendered by `log_conditionings` (all when None).
        scale_factor: latents are multiplied by it after encoding and divided before decoding.
        latent_input: the batch already holds first-stage latents (`B C T H W`): skip the encoder.
        no_cond_log: do not log conditionings.
        compile_model: `torch.compile` the network.
        en_and_decode_n_samples_a_time: first-stage chunk size in samples (all at once when None).
        lr_scale: train/sample video super-resolution from `lr_scale`-times downsampled inputs.
        image_to_video: the image latent is a `concat` condition (CogVideoX-5B-I2V, 1.5-I2V): sampling takes
            the job's image, training the clip's noised first frame (vdm.conditioning.image).
        image_latent_scale: how the image latent is scaled (`scale`, `invert`, `none`: vdm.conditioning.image).
        image_dropout: training drops a sample's image latent to zeros with this probability (SAT: 0.05).
        lora_train: the network carries LoRA adapters; only they (and unfrozen prefixes) train.
        use_pd: progressive distillation (`vdm.training.distill`): needs a discrete denoiser and the DDIM sampler,
            whose grids the rounds distil on; the training step is handed each round's loss (`forward(loss_fn=)`).
        not_trainable_prefixes: parameter-name prefixes frozen by `disable_untrainable_params`;
            `all` freezes everything except LoRA parameters.
    """

    def __init__(
        self,
        network: nn.Module,
        denoiser: nn.Module,
        conditioner: nn.Module,
        first_stage: nn.Module,
        loss_fn,
        sampler_single,
        sampler_ddim=None,
        sampler_multi_prompt=None,
        *,
        input_key: str = "mp4",
        log_keys: Sequence[str] | None = None,
        scale_factor: float = 1.0,
        latent_input: bool = False,
        no_cond_log: bool = False,
        compile_model: bool = False,
        en_and_decode_n_samples_a_time: int | None = None,
        lr_scale: int | None = None,
        image_to_video: bool = False,
        image_latent_scale: str = "scale",
        image_dropout: float = 0.0,
        lora_train: bool = False,
        use_pd: bool = False,
        not_trainable_prefixes: Sequence[str] = ("first_stage_model", "conditioner"),
    ):
        super().__init__()
        self.check_options(lr_scale=lr_scale,
                           en_and_decode_n_samples_a_time=en_and_decode_n_samples_a_time)

        self.model = NetworkWrapper(network, compile_model=compile_model)
        self.denoiser = denoiser
        self.conditioner = conditioner
        self._init_first_stage(first_stage)
        self.loss_fn = loss_fn
        self.sampler_single = sampler_single
        self.sampler_ddim = sampler_ddim
        self.sampler_multi_prompt = sampler_multi_prompt

        self.input_key = input_key
        self.log_keys = list(log_keys) if log_keys is not None else None
        self.scale_factor = scale_factor
        self.latent_input = latent_input
        self.no_cond_log = no_cond_log
        self.compile_model = compile_model
        self.en_and_decode_n_samples_a_time = en_and_decode_n_samples_a_time
        self.lr_scale = None if lr_scale is None else int(lr_scale)
        self.image_to_video, self.image_latent_scale = image_to_video, image_latent_scale
        scale_image_latent(torch.zeros(()), 1.0, image_latent_scale)  # a one-line error for an unknown rule
        self.lora_train = lora_train
        self.use_pd = use_pd
        self.not_trainable_prefixes = list(not_trainable_prefixes)
        self.offload = False
        if lora_train:
            if not any(is_lora_parameter(name) for name, _ in network.named_parameters()):
                raise BadInput("lora_train=true but the network has no LoRA adapters (add them with "
                               "vdm.networks.lora.add_lora before building the engine)")
            self.not_trainable_prefixes.append("model.")  # base weights freeze; LoRA parameters stay trainable
        self._check_channels()
        if self.lr_scale:  # the super-resolution condition: the low-resolution clip's latents, as `concat`
            conditioner.embedders = nn.ModuleList([e for e in conditioner.embedders
                                                   if not isinstance(e, LowResolutionVideo)])
            conditioner.embedders.append(LowResolutionVideo(self.lr_scale, self.encode_video))
        if not 0.0 <= image_dropout <= 1.0:
            raise BadInput(f"image_dropout={image_dropout} must be in [0, 1]")
        if image_to_video:  # the image latent, laid out over the video's frames
            conditioner.embedders = nn.ModuleList([e for e in conditioner.embedders if not isinstance(e, ImageLatents)])
            conditioner.embedders.append(ImageLatents(ucg_rate=image_dropout))
        if use_pd:
            self._check_distillable()

    @staticmethod
    def check_options(lr_scale: int | None = None,
                      en_and_decode_n_samples_a_time: int | None = None) -> None:
        """Reject option values before anything expensive is built."""
        if lr_scale is not None and (int(lr_scale) != lr_scale or lr_scale < 2):
            raise BadInput(f"lr_scale={lr_scale} must be an integer >= 2 (or null to disable super-resolution)")
        if en_and_decode_n_samples_a_time is not None and en_and_decode_n_samples_a_time < 1:
            raise BadInput(f"en_and_decode_n_samples_a_time={en_and_decode_n_samples_a_time} must be >= 1 or null")

    def _check_distillable(self) -> None:
        if not isinstance(self.denoiser, DiscreteDenoiser):
            raise BadInput(f"use_pd=true: progressive distillation needs a discrete denoiser "
                           f"(vdm.diffusion.DiscreteDenoiser over a discretization), not {type(self.denoiser).__name__}")
        if not isinstance(self.sampler_ddim, VideoDDIMSampler):
            raise BadInput("use_pd=true: students sample with DDIM on the discretization's grid; configure "
                           "sampler_ddim (vdm.diffusion.VideoDDIMSampler), not "
                           f"{type(self.sampler_ddim).__name__}")

    @property
    def network(self) -> nn.Module:
        return self.model.diffusion_model

    def _check_channels(self) -> None:
        config = getattr(self.network, "config", None)
        latent_channels = getattr(self.first_stage_model, "latent_channels", None)
        if config is None or latent_channels is None:
            return
        expected = network_in_channels(latent_channels, self.lr_scale, self.image_to_video)
        if config.in_channels != expected:
            extra = " and ".join(n for n, on in (("lr_scale", self.lr_scale), ("image_to_video", self.image_to_video))
                                 if on)
            raise BadInput(f"network.in_channels={config.in_channels} but the first stage gives {latent_channels} "
                           f"latent channels{f' (with {extra})' if extra else ''}: expected {expected}")
        if self.lr_scale:
            s = getattr(self.first_stage_model, "spatial_compression", 1)
            H, W = config.sample_height * s, config.sample_width * s
            if H % self.lr_scale or W % self.lr_scale:
                valid = [k for k in range(2, min(H, W) + 1) if H % k == 0 and W % k == 0]
                raise BadInput(f"lr_scale={self.lr_scale} does not divide the frame size {H}x{W}; valid: {valid}")
        if config.out_channels != latent_channels:
            raise BadInput(f"network.out_channels={config.out_channels} must equal the first stage's "
                           f"latent channels {latent_channels}")

    # -- parameters ---------------------------------------------------------------------------------

    def _init_first_stage(self, first_stage: nn.Module) -> None:
        first_stage = first_stage.eval()
        first_stage.train = _no_train.__get__(first_stage)
        for p in first_stage.parameters():
            p.requires_grad_(False)
        self.first_stage_model = first_stage

    def disable_untrainable_params(self) -> int:
        """Freeze parameters under `not_trainable_prefixes` (`all`: every one), LoRA ones excepted.

        Returns the number of trainable parameter elements left.
        """
        freeze_all = "all" in self.not_trainable_prefixes
        for name, p in self.named_parameters():
            if not p.requires_grad or is_lora_parameter(name):
                continue
            if freeze_all or any(name.startswith(prefix) for prefix in self.not_trainable_prefixes):
                p.requires_grad_(False)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        log.info("trainable parameters: %.3fM of %.3fM", trainable / 1e6,
                 sum(p.numel() for p in self.parameters()) / 1e6)
        return trainable

    # -- first stage --------------------------------------------------------------------------------

    def get_input(self, batch: dict) -> torch.Tensor:
        if self.input_key not in batch:
            raise BadInput(f"batch has no input_key {self.input_key!r} (has {sorted(batch)})")
        return batch[self.input_key]

    def _chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.en_and_decode_n_samples_a_time or x.shape[0]
        return list(x.split(n, dim=0))

    def set_offload(self, enabled: bool = True) -> None:
        """Keep the conditioner and the first stage on the CPU and move each to the network's device only
        while it runs, so that the text encoder and VAE do not sit in GPU memory while the DiT samples."""
        self.offload = enabled
        if enabled:
            self.conditioner.to("cpu")
            self.first_stage_model.to("cpu")

    @contextlib.contextmanager
    def staged(self, module: nn.Module):
        if not getattr(self, "offload", False):
            yield
            return
        device = next(self.network.parameters()).device
        module.to(device)
        try:
            yield
        finally:
            module.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor, generator: torch.Generator | None = None,
                           scaled: bool = True) -> torch.Tensor:
        """`B C T H W` video -> scaled latents `B C T' H' W'` (unscaled with `scaled=False`). With `latent_input`,
        x already is latents. `generator` draws the posterior sample of a first stage that samples one."""
        if self.latent_input:
            return x * self.scale_factor
        kwargs = {} if generator is None else {"generator": generator}
        with self.staged(self.first_stage_model):
            z = torch.cat([self.first_stage_model.encode(chunk, **kwargs) for chunk in self._chunks(x)], dim=0)
        return z.float() * (self.scale_factor if scaled else 1.0)  # float32 whatever the first stage's dtype

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """An image (B, 3, H, W) in [-1, 1] -> its latent (B, 1, C, H', W'): encoded as a 1-frame video, the
        posterior sampled from `generator`, scaled by `image_latent_scale` (vdm.conditioning.image)."""
        return self.image_latent(self.encode_first_stage(image[:, :, None], generator, scaled=False))

    def image_latent(self, z: torch.Tensor) -> torch.Tensor:
        """An unscaled image latent (B, C, 1, h, w) -> (B, 1, C, h, w), scaled by `image_latent_scale`."""
        return rearrange(scale_image_latent(z, self.scale_factor, self.image_latent_scale), "b c t h w -> b t c h w")

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents `B C T H W` -> video `B C T' H' W'`, decoded in sample chunks."""
        z = z / self.scale_factor
        with self.staged(self.first_stage_model):
            return torch.cat([self.first_stage_model.decode(chunk) for chunk in self._chunks(z)], dim=0)

    def encode_video(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Batch video `B T C H W` (or stored latents `B C T H W`) -> network latents `B T C H W`, contiguous
        (on a permuted view, the losses' `randn_like` noise draw is 7x slower). `generator` draws the
        posterior sample (video-to-video draws it from the video's seeded generator)."""
        if not self.latent_input:
            video = rearrange(video, "b t c h w -> b c t h w")
        return rearrange(self.encode_first_stage(video, generator), "b c t h w -> b t c h w").contiguous()

    def decodable(self, z: torch.Tensor) -> torch.Tensor:
        """The sampled latents `B T C H W` a video is decoded from: CogVideoX 1.5's front padding (a latent
        frame added to make whole tokens) dropped; all of them for 1.0."""
        config = getattr(self.network, "config", None)
        return z if config is None else z[:, z.shape[1] - config.decodable_frames(z.shape[1]):]

    def padded(self, z: torch.Tensor) -> torch.Tensor:
        """Training latents `B T C H W` as whole tokens: CogVideoX 1.5 copies the first latent frame in front of
        an odd count (CogVideo's fine-tuning; `decodable` drops it again); 1.0 latents as they are."""
        config = getattr(self.network, "config", None)
        extra = 0 if config is None else config.padded_frames(z.shape[1]) - z.shape[1]
        return torch.cat([z[:, :1].expand(-1, extra, -1, -1, -1), z], dim=1) if extra else z

    def decode_video(self, z: torch.Tensor) -> torch.Tensor:
        """Network latents `B T C H W` -> video `B T C H W` in [-1, 1] (not clamped)."""
        return rearrange(self.decode_first_stage(rearrange(z, "b t c h w -> b c t h w")), "b c t h w -> b t c h w")

    def low_resolution(self, video: torch.Tensor) -> torch.Tensor:
        """Per-frame bilinear downsample by `lr_scale` and upsample back: what the network sees of a video
        as its super-resolution input."""
        return upsample(downsample(video, self.lr_scale), self.lr_scale)

    # -- training -----------------------------------------------------------------------------------

    def prepare_batch(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Encode the batch's video to network latents `B T C H W` (no grad; CogVideoX 1.5: `padded`); with
        `lr_scale`, add its low-resolution clip (`lr_video`), which the conditioner's `LowResolutionVideo` turns
        into the condition; with `image_to_video`, the image latents of its noised first frames
        (`first_frame_latents`). Split from `forward` so that a data-parallel wrapper's forward (which must see the
        gradient-carrying computation) is just `forward`."""
        video = self.get_input(batch)
        if self.lr_scale:
            if self.latent_input:
                raise BadInput("lr_scale needs pixel inputs; it cannot be combined with latent_input=true")
            batch = {**batch, LOW_RESOLUTION_KEY: downsample(video, self.lr_scale)}
        z = self.padded(self.encode_video(video))
        if self.image_to_video:
            batch = {**batch, IMAGE_KEY: layout(self.first_frame_latents(batch), z.shape[1])}
        return z, batch

    @torch.no_grad()
    def first_frame_latents(self, batch: dict) -> torch.Tensor:
        """Training's image latents (B, 1, C, h, w): the clip's first frame with SAT's noise
        (vdm.conditioning.image.noise_first_frame), encoded and scaled as sampling's image; with `latent_input`,
        the unscaled latent `vdm.precompute` stored under `first_frame_latent` (its noise drawn once), scaled."""
        if not self.latent_input:
            return self.encode_image(noise_first_frame(self.get_input(batch)[:, 0].float()))
        if FIRST_FRAME_KEY not in batch:
            raise BadInput(f"image_to_video with latent_input: the batch has no {FIRST_FRAME_KEY!r} (the data's "
                           "latents were precomputed without image_to_video=true; precompute them again)")
        return self.image_latent(batch[FIRST_FRAME_KEY].float())  # stored (B, C, 1, h, w), unscaled

    def shared_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return self(*self.prepare_batch(batch))

    def forward(self, x: torch.Tensor, batch: dict, loss_fn=None) -> tuple[torch.Tensor, dict]:
        """The mean loss of latents `x` (from `prepare_batch`) under `loss_fn` (the engine's own when None:
        e.g. a distillation round passes its loss, which the engine never stores)."""
        loss = (loss_fn or self.loss_fn)(self.model, self.denoiser, self.conditioner, x, batch).mean()
        return loss, {"loss": loss}

    # -- sampling -----------------------------------------------------------------------------------

    def unconditional_keys(self) -> list[str]:
        """Batch keys whose unconditional embedding is all zeros: those dropped to zeros in training."""
        return [e.input_key for e in self.conditioner.embedders
                if e.ucg_rate > 0 and getattr(e, "ucg_value", None) is None]

    def conditioning(self, batch: dict) -> tuple[dict, dict]:
        """(cond, uc) for sampling: every embedder's output, e.g. the super-resolution latents of the batch's
        `lr_video` in both."""
        with self.staged(self.conditioner):
            return self.conditioner.get_unconditional_conditioning(
                batch, force_uc_zero_embeddings=self.unconditional_keys())

    @torch.no_grad()
    def sample_single(self, cond: dict, uc: dict | None, randn: torch.Tensor, sampler=None,
                      num_steps: int | None = None, generator: torch.Generator | None = None,
                      control: AttentionControl | None = None, grid=None, cache=None, sequence=None) -> torch.Tensor:
        """Sample latents `B T C H W` from `randn` with the single-prompt sampler, under `control` (plain
        attention when None; e.g. visualize on one prompt), over `grid` (the sampler's own when None; e.g. the
        last steps of it, from a noised video), with `cache` (a fresh `vdm.networks.caches.StepCache` for these
        videos; their rows share its decisions), their tokens split over `sequence` (`vdm.distributed.Processes`:
        Ulysses; every one of them calls this alike)."""
        sampler = sampler or self.sampler_single
        return sampler(partial(self.denoiser, self.model), randn, cond, uc=uc, num_steps=num_steps,
                       generator=generator, grid=grid,
                       ctx=CallContext(control or AttentionControl(), cache=cache, group=sequence))

    @torch.no_grad()
    def sample_ddim(self, cond: dict, uc: dict | None, randn: torch.Tensor, num_steps: int | None = None,
                    control: AttentionControl | None = None) -> torch.Tensor:
        if self.sampler_ddim is None:
            raise BadInput("this engine has no sampler_ddim; configure one to use sample_ddim")
        return self.sample_single(cond, uc, randn, sampler=self.sampler_ddim, num_steps=num_steps, control=control)

    # -- logging ------------------------------------------------------------------------------------

    def log_conditionings(self, batch: dict, n: int = 4) -> dict[str, list[str]]:
        """The batch's text conditionings under `log_keys` (all string-valued keys when None)."""
        if self.no_cond_log:
            return {}
        keys = self.log_keys if self.log_keys is not None else [k for k, v in batch.items() if _is_text(v)]
        return {k: [str(v) for v in batch[k][:n]] for k in keys if k in batch and _is_text(batch[k])}

    @torch.no_grad()
    def log_video(self, batch: dict, n: int = 4, num_steps: int | None = None,
                  generator: torch.Generator | None = None, sampler=None) -> dict[str, torch.Tensor]:
        """Inputs, first-stage reconstructions and samples (with `sampler`, the single-prompt one when None)
        for the first `n` batch items, as videos `B T C H W` in [-1, 1] (inputs only when the batch holds
        pixels)."""
        batch = {k: v[:n] for k, v in batch.items()}
        z, batch = self.prepare_batch(batch)
        log = {} if self.latent_input else {"inputs": self.get_input(batch)}
        log["reconstructions"] = self.decode_video(self.decodable(z))
        cond, uc = self.conditioning(batch)
        randn = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        log["samples"] = self.decode_video(self.decodable(self.sample_single(cond, uc, randn, sampler, num_steps,
                                                                             generator)))
        return {k: v.clamp(-1, 1) for k, v in log.items()}

    @torch.no_grad()
    def sample_multi_prompt(self, cond_list: list[dict], uc_list: list[dict], randn: torch.Tensor,
                            tile_size: int | None = None, overlap_size: int | None = None,
                            num_steps: int | None = None, generator: torch.Generator | None = None,
                            sampler=None, stats: dict | None = None,
                            control: AttentionControl | None = None, first_segment: dict | None = None,
                            sequence=None, cache=None) -> torch.Tensor:
        """One long latent `(1, T_long, C, H, W)` following the prompts in order (DiTCtrl, SPEC §5), under
        `control` (plain attention when None). `tile_size`/`overlap_size` override the sampler's;
        `first_segment`: condition entries of the first segment only (image-to-video: its image latent);
        `sequence`: the processes each pass's tokens are split over (Ulysses); `cache`: a maker of fresh step
        caches, one per segment pass (what they computed goes to `stats["cache"]`)."""
        sampler = self.multi_prompt_sampler(sampler, tile_size, overlap_size)
        config = self.network.config
        return sampler(partial(self.denoiser, self.model), randn, cond_list, uc_list, num_steps=num_steps,
                       generator=generator, num_layers=config.num_layers,
                       ctx=CallContext(control or AttentionControl(), group=sequence), stats=stats,
                       first_segment=first_segment, **({} if cache is None else {"cache": cache}))

    def multi_prompt_sampler(self, sampler=None, tile_size: int | None = None, overlap_size: int | None = None,
                             frames: int | None = None):
        """`sampler` (the engine's multi-prompt one when None) with its tiles set and checked against the network:
        `tile_size`, else the sampler's, else `frames` (the job's clip length), else the network's frame count."""
        sampler = sampler or self.sampler_multi_prompt
        if sampler is None:
            raise BadInput("this engine has no sampler_multi_prompt; configure one to sample multi-prompt videos")
        config = self.network.config
        most = config.padded_frames(config.max_latent_frames)  # 1.5: whole 2-frame tokens
        sampler = replace(sampler, tile_size=tile_size or sampler.tile_size or frames or most,
                          overlap_size=sampler.overlap_size if overlap_size is None else overlap_size)
        check_tiles(sampler.tile_size, sampler.overlap_size, most)
        if sampler.tile_size % config.frames_per_token:
            raise BadInput(f"tile_size={sampler.tile_size}: CogVideoX 1.5 tiles are whole tokens of "
                           f"{config.frames_per_token} latent frames (an even tile_size)")
        return sampler

    @torch.no_grad()
    def sample_pair(self, cond: dict, uc: dict | None, randn: torch.Tensor, sampler=None,
                    num_steps: int | None = None, generator: torch.Generator | None = None,
                    control: AttentionControl | None = None, cache=None, sequence=None) -> torch.Tensor:
        """Editing (word swap, reweighting; SPEC §5): rows [source, target] of `cond` start from the same
        noise `randn` (1, T, C, H, W) and share every noise draw; inside its window `control` lets the
        target attend to the source (no blending); `cache`: a step cache both rows share; `sequence`: the
        processes their tokens are split over (Ulysses). Returns latents
        (2, T, C, H, W)."""
        sampler = replace(sampler or self.sampler_single, share_noise_across_batch=True)
        steps = num_steps or sampler.num_steps
        control = control or AttentionControl()
        control.validate(self.network.config.num_layers, steps)
        pairs = sampler.guider.share_pairs([(0, 1)], 2)  # under CFG: [uc_src, uc_tgt, c_src, c_tgt]
        x = randn.expand(2, *randn.shape[1:]).clone()
        return sampler(partial(self.denoiser, self.model), x, cond, uc=uc, num_steps=steps, generator=generator,
                       ctx=CallContext(control, pairs, cache=cache, group=sequence))

    @torch.no_grad()
    def invert(self, cond: dict, uc: dict | None, z: torch.Tensor, sampler, iterations: int = 0,
               sequence=None) -> torch.Tensor:
        """DDIM inversion (`vdm.diffusion.inversion`) of clean latents `z` `B T C H W` (x scale factor) under
        `cond`, guided as `sampler.guider` says, over `sampler`'s grid walked backwards: the noise from which DDIM
        sampling over that grid returns about `z`; `iterations`: fixed-point iterations a step. `sequence`: the
        processes its tokens are split over."""
        denoise = GuidedDenoiser(partial(self.denoiser, self.model), sampler.guider, cond, cond if uc is None else uc,
                                 {"ctx": CallContext(AttentionControl(), group=sequence)})
        return invert_ddim(denoise, z, sampler.grid(), iterations, sampler.verbose)

    # -- attention control --------------------------------------------------------------------------

    def switch_adaln_layer(self, name: str, **options) -> AttentionControl:
        """The attention control named `name` with `options` (the seed's name for choosing it; the
        reference mixin names are aliases), to hand to `sample_*(control=...)`. It changes behaviour, not
        parameters, and the engine keeps none: the control travels with each sampling call."""
        return make_control(name, **options)
