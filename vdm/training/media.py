"""TensorBoard media every `video_every` steps: a short validation clip's input, first-stage reconstruction
and (EMA) sample as videos, and its caption.

What keeps it cheap and memory-safe at CogVideoX size: the first `video_samples` items of the batch, cut to
their first `video_latent_frames` latent frames (r·(k−1)+1 pixel frames for a first stage of temporal
compression r), sampled in `video_num_steps` steps under the run's autocast (bf16 for the presets), with
the text encoder and first stage on the CPU except while each runs (`video_offload`), so that the T5 and the
VAE do not sit beside the sampling DiT. Under FSDP every process samples (the network's forward gathers
shards from all of them) and process 0 writes. The run's random streams are left where they were.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from vdm.training.ema import EMA
from vdm.training.parallel import DataParallel
from vdm.training.tensorboard import TensorBoard


@dataclass(frozen=True)
class MediaOptions:
    every: int  # 0: never
    samples: int
    num_steps: int
    latent_frames: int | None  # None: the whole clip
    offload: bool
    sampler: Any = None  # None: the engine's single-prompt sampler (a distillation round: its student's DDIM)

    def due(self, step: int, max_steps: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == max_steps)


def clip_batch(batch: dict, n: int, latent_frames: int | None, temporal_compression: int,
               latent_input: bool, input_key: str) -> dict:
    """The first `n` items, their video cut to its first `latent_frames` latent frames (stored latents are
    `B C T H W`, pixels `B T C H W`)."""
    batch = {k: v[:n] for k, v in batch.items()}
    if latent_frames is not None:
        video = batch[input_key]
        if latent_input:
            batch[input_key] = video[:, :, :latent_frames]
        else:
            batch[input_key] = video[:, : temporal_compression * (latent_frames - 1) + 1]
    return batch


@contextlib.contextmanager
def offloaded(engine: nn.Module, enabled: bool, device: torch.device):
    """The engine's conditioner and first stage on the CPU except while each runs; back on `device` after."""
    if not enabled:
        yield
        return
    engine.set_offload(True)
    try:
        yield
    finally:
        engine.set_offload(False)
        engine.conditioner.to(device)
        engine.first_stage_model.to(device)


@torch.no_grad()
def log_media(engine: nn.Module, batch: dict, tb: TensorBoard | None, step: int, ema: EMA | None,
              options: MediaOptions, parallel: DataParallel) -> None:
    """Write the step's videos and captions (`tb` on the writing process, None on the others)."""
    first_stage = engine.first_stage_model
    batch = clip_batch(batch, options.samples, options.latent_frames, getattr(first_stage, "temporal_compression", 1),
                       engine.latent_input, engine.input_key)
    device = parallel.device
    engine.eval()
    try:
        with (torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
              ema.applied() if ema is not None else contextlib.nullcontext(),
              offloaded(engine, options.offload, device), parallel.autocast()):
            videos = engine.log_video(batch, n=options.samples, num_steps=options.num_steps,
                                      generator=torch.Generator(device=device).manual_seed(step),
                                      sampler=options.sampler)
    finally:
        engine.train()
    if tb is None:
        return
    for key, video in videos.items():
        tb.video(f"video/{key}", video.float(), step)
    for key, lines in engine.log_conditionings(batch, n=options.samples).items():
        tb.text(f"conditioning/{key}", lines, step)
