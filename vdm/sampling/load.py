"""Loading a model to sample from — a vdm training run or a released CogVideoX folder — and building its
samplers with the job's options (steps, guidance, schedule rescale, multi-prompt layout)."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from vdm.build import CONF_DIR, build_engine, instantiate
from vdm.diffusion.discretization import RESCALES
from vdm.engine import VideoDiffusionEngine
from vdm.errors import BadInput, NotFound
from vdm.networks.lora_interop import load_diffusers_lora
from vdm.pretrained import engine_config, read_folder
from vdm.runs import (
    EMA,
    checkpoint_of,
    find_runs,
    latest_checkpoint,
    load_weights,
    read_distillation,
    read_run_config,
    read_state,
)

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    engine: VideoDiffusionEngine
    config: DictConfig  # the engine's composed config (a run's resolved training config, or a folder's)
    source: Path  # the checkpoint folder or the CogVideoX folder
    samples_dir: Path  # where its samples go unless output_dir is given
    distilled: dict | None = None  # a progressive-distillation student's record (its checkpoint's distill.json)


def sampling_dtype(name: str | None, device: str) -> torch.dtype:
    """`dtype=bf16|fp16|fp32`; null: bf16 on CUDA, fp32 on the CPU."""
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise BadInput(f"dtype={name!r}; valid: {', '.join(DTYPES)} (or null: bf16 on CUDA, fp32 on the CPU)")
    return DTYPES[name]


def check_rescale(rescale: str | None) -> None:
    if rescale is not None and rescale not in RESCALES:
        raise BadInput(f"rescale={rescale!r}; valid: {', '.join(RESCALES)} (or null: the model's own)")


def check_source(pretrained: str | None, checkpoint: str | None) -> None:
    if pretrained is not None and checkpoint is not None:
        raise BadInput("give pretrained=<CogVideoX folder> or checkpoint=<run>, not both (a LoRA run on a "
                       "pretrained base records its folder: checkpoint=<run> alone)")


def load_model(pretrained: str | None, checkpoint: str | None, runs_root: str, use_ema: bool = True,
               device: str = "cpu", dtype: torch.dtype = torch.float32, compile_model: bool = False,
               lora: str | None = None) -> LoadedModel:
    """A CogVideoX folder (`pretrained`) or a run's checkpoint (`checkpoint`, default: the latest run), with
    the network, text encoder and first stage in `dtype` on `device`; `lora`: a diffusers LoRA file injected
    into the network (vdm.networks.lora_interop); `compile_model` compiles the network in place (its parameter
    names do not change)."""
    check_source(pretrained, checkpoint)
    if pretrained is not None:
        loaded = load_pretrained(pretrained, dtype)
    else:
        loaded = load_run(find_checkpoint(checkpoint, runs_root), use_ema, dtype)
    if lora is not None:
        load_diffusers_lora(loaded.engine.network, lora)
        loaded.engine.network.to(dtype)
    engine = loaded.engine.to(device).eval()
    # The text encoder loads lazily in the conditioner's dtype (so from_pretrained keeps the modules T5
    # needs in float32); the denoiser's tables and the sampler's arithmetic stay float32.
    engine.conditioner.to(dtype)
    engine.first_stage_model.to(dtype)
    if compile_model:
        engine.network.compile()
    return loaded


def load_pretrained(folder: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A released CogVideoX folder: its network, VAE (and scaling factor), T5 and schedule."""
    checked = read_folder(folder)
    config = engine_config(checked)
    engine = build_engine(config, network_dtype=dtype)
    log.info("loaded CogVideoX folder %s (%s)", checked.root, checked.variant)
    return LoadedModel(engine, config, checked.root, Path("samples") / checked.root.resolve().name)


def find_checkpoint(checkpoint: str | None, runs_root: str) -> Path:
    if checkpoint is not None:
        return checkpoint_of(checkpoint)
    runs = find_runs(Path(runs_root))
    if not runs:
        raise NotFound(f"no training run with a checkpoint under {runs_root}/; train one with "
                       "`python train.py`, pass checkpoint=<run dir or checkpoint dir>, or sample a "
                       "released model with pretrained=<CogVideoX folder>")
    return latest_checkpoint(runs[-1])


def load_run(checkpoint: Path, use_ema: bool = True, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Rebuild a run's engine from its config.yaml and load the checkpoint's (EMA) weights."""
    run_dir = checkpoint.parent.parent
    config = read_run_config(run_dir)
    # The run's compile_model sped up its training; sampling compiles only when sample.py's own
    # compile_model says so (load_model), so a run trained compiled samples eagerly by default.
    config.compile_model = False
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
            raise BadInput(f"{run_dir / 'config.yaml'}: a LoRA run must record init_from or pretrained "
                           "(its base weights)")
        missing = set(weights) - set(engine.network.state_dict())
        if missing:
            raise BadInput(f"{weights_file}: adapter weight {sorted(missing)[0]!r} has no place in the network")
        engine.network.load_state_dict(weights, strict=False)
        engine.network.to(dtype)
    else:
        engine = build_engine(config, network_weights=weights, weights_source=str(weights_file), network_dtype=dtype)
    log.info("loaded %s (%s weights)", checkpoint, "EMA" if weights_file.name == EMA else "raw")
    return LoadedModel(engine, config, checkpoint, run_dir / "samples", read_distillation(checkpoint))


def student_defaults(cfg: DictConfig, distilled: dict | None, explicit: Collection[str]) -> DictConfig:
    """A distilled student samples as it was distilled, with DDIM at its step count and no guidance (it learnt
    the guided teacher), unless the command line (`explicit`) chose the sampler, steps, guider or cfg."""
    if distilled is None:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):  # guider is absent unless chosen
        if "steps" not in explicit:
            cfg.steps = distilled["student_steps"]
        if "sampler" not in explicit:
            cfg.sampler = OmegaConf.merge(OmegaConf.load(CONF_DIR / "sampler" / "ddim.yaml"),
                                          {"verbose": cfg.sampler.get("verbose", True)})
        if "guider" not in explicit and "cfg" not in explicit:
            cfg.guider = OmegaConf.load(CONF_DIR / "guider" / "none.yaml")
    return cfg


def make_sampler(model_config: DictConfig, sampler: DictConfig, num_steps: int, cfg_scale: float | None = None,
                 guider: DictConfig | None = None, rescale: str | None = None):
    """Instantiate a sampler config (from `conf/sampler/`) over the model's discretization and guider (or
    the given one from `conf/guider/`) with `num_steps`. `cfg_scale` None keeps the guider's own scale (a
    scale for a guider without one, `none`, means CFG at that scale);
    `rescale` None the discretization's own."""
    return _instantiate_over_model(model_config, "sampler", sampler, num_steps, cfg_scale, guider, rescale)


def make_multi_prompt_sampler(model_config: DictConfig, num_steps: int, cfg_scale: float | None = None,
                              guider: DictConfig | None = None, rescale: str | None = None, **options):
    """The model's multi-prompt sampler (the project default for runs older than it), with `num_steps`
    and any option (`tile_size`, `overlap_size`, `num_transition_blocks`, `longer_mid_segment`, `reuse`)
    that is not None."""
    node = model_config.get("sampler_multi_prompt") or OmegaConf.load(CONF_DIR / "config.yaml").sampler_multi_prompt
    overrides = {k: v for k, v in options.items() if v is not None}
    return _instantiate_over_model(model_config, "sampler_multi_prompt", node, num_steps, cfg_scale, guider,
                                   rescale, **overrides)


def _instantiate_over_model(model_config: DictConfig, key: str, node: DictConfig, num_steps: int,
                            cfg_scale: float | None, guider: DictConfig | None, rescale: str | None, **overrides):
    """The sampler `node` over the model's discretization, with its own guider (the model's `guider` for
    single videos, `sampler_multi_prompt.guider` for multi-prompt ones) unless the job names one: `guider`
    replaces it, `cfg_scale` sets its scale (on a guider without one, `none`: CFG at that scale)."""
    merged = OmegaConf.merge(model_config, {key: node})
    sampler = merged[key]
    # A run's config.yaml is stored resolved, so its samplers hold copies of the discretization: point them
    # back at the model's own, which `rescale` sets.
    if "discretization" in sampler:
        sampler.discretization = "${discretization}"
    own = OmegaConf.create(OmegaConf.to_container(sampler.guider if guider is None else guider, resolve=True))
    if cfg_scale is not None:
        if "scale" not in own:
            own = OmegaConf.load(CONF_DIR / "guider" / "cfg.yaml")
        own.scale = cfg_scale
    sampler.guider = own
    sampler.num_steps = num_steps
    for name, value in overrides.items():
        sampler[name] = value
    if rescale is not None:
        if "rescale" not in merged.discretization:
            raise BadInput(f"rescale={rescale} applies to zero-terminal-SNR schedules; this model's "
                           f"discretization ({merged.discretization._target_}) has none")
        merged.discretization.rescale = rescale
    return instantiate(merged[key])


# CogVideoX 1.5's sampling size: its config's sample size (300x300 latents) is the RoPE's largest grid, not a
# training resolution; CogVideoX1.5-5B samples 768x1360 (its model card, diffusers' docs).
SIZE_15 = (768, 1360)


def default_size(config, s: int) -> tuple[int, int]:
    """The latent (H, W) a job samples when it gives no height/width: the network's sample size, or for
    CogVideoX 1.5 768x1360 when that fits (a smaller network: its sample size)."""
    if config.patch_size_t is not None and SIZE_15[0] // s <= config.sample_height and \
            SIZE_15[1] // s <= config.sample_width:
        return SIZE_15[0] // s, SIZE_15[1] // s
    return config.sample_height, config.sample_width


def latent_shape(engine: VideoDiffusionEngine, num_frames: int | None, height: int | None,
                 width: int | None) -> tuple[int, int, int, int]:
    """(T, C, H, W) latents sampled for a clip of the given pixel size (default: the network's trained
    maximum, 49 frames at 480x720 for CogVideoX 1.0; 81 frames at 768x1360 for 1.5, whose 21 latent
    frames are sampled as 22, the first dropped before decoding)."""
    config, stage = engine.network.config, engine.first_stage_model
    r, s = stage.temporal_compression, stage.spatial_compression
    T = config.max_latent_frames if num_frames is None else _latent_frames(num_frames, r)
    H, W = default_size(config, s)
    H = H if height is None else _latent_size("height", height, s)
    W = W if width is None else _latent_size("width", width, s)
    if T > config.max_latent_frames or H > config.sample_height or W > config.sample_width:
        raise BadInput(f"num_frames/height/width give latents {T}x{H}x{W}; the network takes at most "
                       f"{config.max_latent_frames}x{config.sample_height}x{config.sample_width} "
                       f"({(config.max_latent_frames - 1) * r + 1} frames of {config.sample_height * s}x"
                       f"{config.sample_width * s})")
    if config.use_learned_positional_embeddings and (H, W) != (config.sample_height, config.sample_width):
        raise BadInput(f"height={H * s} width={W * s}: this model's learned positions (CogVideoX-5B-I2V) serve only "
                       f"{config.sample_height * s}x{config.sample_width * s}, as in diffusers")
    if config.patch_size_t is not None and T % 2 == 0:
        raise BadInput(f"num_frames={(T - 1) * r + 1} gives {T} latent frames; CogVideoX 1.5 samples an odd count "
                       f"(num_frames = {2 * r}k+1, e.g. {(T - 2) * r + 1} or {T * r + 1})")
    return config.padded_frames(T), stage.latent_channels, H, W


def _latent_frames(num_frames: int, r: int) -> int:
    if num_frames < 1 or (num_frames - 1) % r:
        raise BadInput(f"num_frames={num_frames} must be r*k+1 for the first stage's temporal compression r={r}")
    return (num_frames - 1) // r + 1


def _latent_size(name: str, size: int, s: int) -> int:
    if size < 1 or size % s:
        raise BadInput(f"{name}={size} must be a positive multiple of the first stage's spatial compression {s}")
    return size // s
