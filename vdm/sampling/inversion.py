"""Editing a user's video (`mode=edit|reweight video=<mp4>`): the video is encoded and DDIM-inverted under the
source prompt (`vdm.diffusion.inversion`), then the edit pair is sampled with DDIM from that noise: the source
row reconstructs the video and the target row takes the source's keys and values where the control's window
says (KV-sharing, reweighting), as `mode=edit` does for a pair the model samples itself."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from omegaconf import DictConfig

from vdm.diffusion.guiders import EditPairGuidance, Guider, IdentityGuider, VanillaCFG
from vdm.diffusion.samplers import GridSampler, VideoDDIMSampler
from vdm.engine import VideoDiffusionEngine
from vdm.errors import BadInput
from vdm.networks.attention_control import AttentionControl
from vdm.sampling.output import to_uint8

# The target row's guidance when the job samples unguided (the synthetic world's default): an edit from inverted
# noise follows the source's colour and shape unless guided towards its prompt (bench/inversion_edit.py).
UNGUIDED_TARGET_CFG = 3.0


@dataclass(frozen=True)
class InversionEdit:
    """The two DDIM samplers of a video edit over the job's grid: `invert` (the source prompt's guidance while
    inverting) and `pair` (the pair: the target row at `inversion.target_cfg` or guided as the job, the source row
    at `inversion.source_cfg`);
    `recorded`: each row's sampler as samples.jsonl names it."""

    invert: GridSampler
    pair: GridSampler
    recorded: tuple[GridSampler, GridSampler]  # (source, target): DDIM with the guidance each row had
    options: dict  # inversion.* as given, for samples.jsonl

    @classmethod
    def of(cls, cfg: DictConfig, sampler: GridSampler) -> InversionEdit:
        """From the job's options and its sampler (its discretization, guider, steps and guidance branches)."""
        options = {k: cfg.inversion[k] for k in ("cfg", "source_cfg", "target_cfg", "iterations")}
        for key in ("cfg", "source_cfg", "target_cfg"):
            if options[key] is not None and options[key] < 1:
                raise BadInput(f"inversion.{key}={options[key]} must be >= 1 (1: the conditional estimate alone) "
                               "or null")
        if options["iterations"] < 0:
            raise BadInput(f"inversion.iterations={options['iterations']} must be >= 0 (0: plain DDIM inversion)")
        ddim = VideoDDIMSampler(sampler.discretization, sampler.guider, num_steps=sampler.num_steps,
                                verbose=sampler.verbose, branches=sampler.branches)
        invert_guider: Guider = IdentityGuider() if options["cfg"] in (None, 1) else VanillaCFG(options["cfg"])
        target = options["target_cfg"]
        if target is None and sampler.guider.num_branches == 1:  # an unguided job: the edit still needs guidance
            target = UNGUIDED_TARGET_CFG
        target_guider = sampler.guider if target is None else VanillaCFG(target)
        source = 1.0 if options["source_cfg"] is None else options["source_cfg"]
        pair_guider = EditPairGuidance(target_guider, source)
        recorded = (replace(ddim, guider=IdentityGuider() if source == 1 else VanillaCFG(source)),
                    replace(ddim, guider=target_guider))
        # every process of the video inverts it whole (one row: nothing to split between guidance branches)
        return cls(replace(ddim, guider=invert_guider, branches=None), replace(ddim, guider=pair_guider), recorded,
                   options)

    def edit(self, engine: VideoDiffusionEngine, cond: dict, uc: dict, video: torch.Tensor, seed: int,
             control: AttentionControl, cache=None, sequence=None) -> torch.Tensor:
        """Latents (2, T, C, H, W) [source, target] of `video` (1, F, 3, H, W) in [-1, 1]: its latent (the
        posterior sample drawn from a generator seeded by `seed`; CogVideoX 1.5 pads an odd count with a copy of
        its first latent) inverted under row 0 of `cond` / `uc`, then the pair from that noise under `control`."""
        z = engine.padded(engine.encode_video(video, torch.Generator().manual_seed(seed)))
        source = {k: v[:1] for k, v in cond.items()}
        source_uc = {k: v[:1] for k, v in uc.items()}
        noise = engine.invert(source, source_uc, z, self.invert, self.options["iterations"], sequence=sequence)
        return engine.sample_pair(cond, uc, noise, sampler=self.pair, control=control, cache=cache, sequence=sequence)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos (T, 3, H, W) in [-1, 1] as the 8-bit frames written to disk."""
    mse = ((torch.from_numpy(to_uint8(a)).double() - torch.from_numpy(to_uint8(b)).double()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def check_edit_input(cfg: DictConfig, explicit: frozenset[str]) -> None:
    """What a video edit cannot take, refused in one line before anything is written."""
    name = cfg.sampler.get("_target_", "").rsplit(".", 1)[-1]
    if "sampler" in explicit and name != VideoDDIMSampler.__name__:
        raise BadInput(f"sampler={name}: mode={cfg.mode} with video= samples with DDIM (sampler=ddim), the inverse "
                       "of its inversion; another sampler would not reconstruct the video")
