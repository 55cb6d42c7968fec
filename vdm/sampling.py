"""Sampling from a trained run: load the engine from a checkpoint, draw videos for prompts, write them.

`sample.py` is a thin Hydra edge over `load_engine`, `make_sampler`, `sample_latents` and `write_samples`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from vdm.atomic import atomic_path
from vdm.build import CONF_DIR, build_engine, instantiate
from vdm.engine import VideoDiffusionEngine
from vdm.training.checkpoint import EMA, latest_checkpoint, load_weights, read_state
from vdm.training.runs import checkpoint_of, find_runs, read_run_config

log = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    engine: VideoDiffusionEngine
    config: DictConfig  # the run's resolved training config
    checkpoint: Path


def find_checkpoint(checkpoint: str | None, runs_root: str) -> Path:
    if checkpoint is not None:
        return checkpoint_of(checkpoint)
    runs = find_runs(Path(runs_root))
    if not runs:
        raise FileNotFoundError(f"no training run with a checkpoint under {runs_root}/; train one with "
                                "`python train.py` or pass checkpoint=<run dir or checkpoint dir>")
    return latest_checkpoint(runs[-1])


def load_engine(checkpoint: Path, use_ema: bool = True, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a run's engine from its config.yaml and load the checkpoint's (EMA) weights."""
    run_dir = checkpoint.parent.parent
    config = read_run_config(run_dir)
    state = read_state(checkpoint)
    weights_file = checkpoint / EMA if use_ema and (checkpoint / EMA).is_file() else checkpoint
    weights = {k: v for k, v in load_weights(weights_file).items() if not k.startswith("__")}
    if state.lora:
        if config.get("init_from"):
            engine = build_engine(config, network_weights=load_weights(Path(config.init_from)),
                                  weights_source=config.init_from)
        elif config.get("pretrained"):
            engine = build_engine(config)  # the base is the CogVideoX folder's transformer
        else:
            raise ValueError(f"{run_dir / 'config.yaml'}: a LoRA run must record init_from or pretrained "
                             "(its base weights)")
        missing = set(weights) - set(engine.network.state_dict())
        if missing:
            raise ValueError(f"{weights_file}: adapter weight {sorted(missing)[0]!r} has no place in the network")
        engine.network.load_state_dict(weights, strict=False)
    else:
        engine = build_engine(config, network_weights=weights, weights_source=str(weights_file))
    log.info("loaded %s (%s weights)", checkpoint, "EMA" if weights_file.name == EMA else "raw")
    return LoadedRun(engine.to(device).eval(), config, checkpoint)


def make_sampler(run_config: DictConfig, sampler: DictConfig, num_steps: int, cfg_scale: float,
                 guider: DictConfig | None = None):
    """Instantiate a sampler config (from `conf/sampler/`) over the run's discretization and its guider
    (or the given one from `conf/guider/`), with `num_steps` and the guidance scale `cfg_scale`."""
    return _instantiate_over_run(run_config, "sampler", sampler, num_steps, cfg_scale, guider)


def make_multi_prompt_sampler(run_config: DictConfig, num_steps: int, cfg_scale: float,
                              guider: DictConfig | None = None, **layout):
    """The run's multi-prompt sampler (the project default for runs older than it), with `num_steps`,
    the guidance scale and any layout option (`tile_size`, `overlap_size`, `num_transition_blocks`,
    `longer_mid_segment`) that is not None."""
    node = run_config.get("sampler_multi_prompt") or OmegaConf.load(CONF_DIR / "config.yaml").sampler_multi_prompt
    overrides = {k: v for k, v in layout.items() if v is not None}
    return _instantiate_over_run(run_config, "sampler_multi_prompt", node, num_steps, cfg_scale, guider, **overrides)


def _instantiate_over_run(run_config: DictConfig, key: str, node: DictConfig, num_steps: int, cfg_scale: float,
                          guider: DictConfig | None, **overrides):
    merged = OmegaConf.merge(run_config, {key: node})
    if guider is not None:
        merged.guider = guider
    merged[key].num_steps = num_steps
    for name, value in overrides.items():
        merged[key][name] = value
    if "scale" in merged.guider:
        merged.guider.scale = cfg_scale
    return instantiate(merged[key])


def latent_shape(engine: VideoDiffusionEngine, num_frames: int | None, height: int | None,
                 width: int | None) -> tuple[int, int, int, int]:
    """(T, C, H, W) latents for a clip of the given pixel size (default: the network's trained maximum)."""
    config, stage = engine.network.config, engine.first_stage_model
    r, s = stage.temporal_compression, stage.spatial_compression
    T = config.max_latent_frames if num_frames is None else _latent_frames(num_frames, r)
    H = config.sample_height if height is None else _latent_size("height", height, s)
    W = config.sample_width if width is None else _latent_size("width", width, s)
    if T > config.max_latent_frames or H > config.sample_height or W > config.sample_width:
        raise ValueError(f"num_frames/height/width give latents {T}x{H}x{W}; the network takes at most "
                         f"{config.max_latent_frames}x{config.sample_height}x{config.sample_width} "
                         f"({(config.max_latent_frames - 1) * r + 1} frames of {config.sample_height * s}x"
                         f"{config.sample_width * s})")
    return T, stage.latent_channels, H, W


def _latent_frames(num_frames: int, r: int) -> int:
    if num_frames < 1 or (num_frames - 1) % r:
        raise ValueError(f"num_frames={num_frames} must be r*k+1 for the first stage's temporal compression r={r}")
    return (num_frames - 1) // r + 1


def _latent_size(name: str, size: int, s: int) -> int:
    if size < 1 or size % s:
        raise ValueError(f"{name}={size} must be a positive multiple of the first stage's spatial compression {s}")
    return size // s


@torch.no_grad()
def sample_latents(engine: VideoDiffusionEngine, sampler, prompts: list[str], seeds: list[int],
                   shape: tuple[int, int, int, int], low_res: torch.Tensor | None = None) -> torch.Tensor:
    """Latents `B T C H W` for one batch: prompt i from noise seeded by seeds[i]. `low_res` (B T C H W
    pixels at full size) conditions a super-resolution model."""
    device = next(engine.parameters()).device
    randn = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    concat = None
    if low_res is not None:
        concat = engine.encode_video(low_res.to(device))
    cond, uc = engine.conditioning({k: prompts for k in text_keys(engine)}, concat)
    generator = torch.Generator(device=device).manual_seed(seeds[0])
    return engine.sample_single(cond, uc, randn, sampler=sampler, generator=generator)


def text_keys(engine: VideoDiffusionEngine) -> list[str]:
    """The batch keys the conditioner reads (its embedders' input keys)."""
    return [e.input_key for e in engine.conditioner.embedders]


def to_uint8(video: torch.Tensor):
    """(T, C, H, W) in [-1, 1] -> numpy (T, H, W, C) uint8."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(frames, "t c h w -> t h w c").cpu().numpy()


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write atomically (temp file, then rename); refuses to replace an existing file."""
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose another output_dir")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def save_latent(latent: torch.Tensor, path: Path) -> None:
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose another output_dir")
    with atomic_path(path) as tmp:
        save_file({"latent": latent.contiguous().cpu()}, tmp)
