"""A sampling job end to end (`sample.py`'s body): check the options, plan the videos, load the model,
sample, decode and write the files and samples.jsonl."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from vdm.data.video_io import read_mp4
from vdm.diffusion.multi_prompt import check_tiles
from vdm.engine import VideoDiffusionEngine
from vdm.sampling.jobs import Job, check_tokens, control_options, plan_jobs, read_prompts
from vdm.sampling.load import (
    check_rescale,
    check_source,
    latent_shape,
    load_model,
    make_multi_prompt_sampler,
    make_sampler,
    sampling_dtype,
)
from vdm.sampling.output import check_free, write_jsonl, write_video

log = logging.getLogger(__name__)
LAYOUT = ("tile_size", "overlap_size", "num_transition_blocks", "longer_mid_segment", "reuse")


def sample(cfg: DictConfig) -> Path:
    """Run the job `cfg` (conf/sample.yaml); returns the output folder."""
    videos = read_prompts(cfg)
    if cfg.num_samples < 1 or cfg.batch_size < 1 or cfg.steps < 1:
        raise ValueError("num_samples, batch_size and steps must be >= 1")
    jobs = plan_jobs(cfg, videos)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dtype = sampling_dtype(cfg.dtype, device)
    check_rescale(cfg.rescale)
    if cfg.fps is not None and cfg.fps <= 0:
        raise ValueError(f"fps={cfg.fps} must be > 0")
    check_source(cfg.pretrained, cfg.checkpoint)

    suffixes = ["", "_target"] if cfg.mode != "sample" else [""]
    if cfg.output_dir:  # checked now; a default folder is new (it is named by the time)
        out = Path(cfg.output_dir)
        check_free(_planned(out, jobs, suffixes, cfg.save_latents))
    loaded = load_model(cfg.pretrained, cfg.checkpoint, cfg.runs_root, cfg.use_ema, device, dtype, cfg.compile_model)
    engine, config = loaded.engine, loaded.config
    out = Path(cfg.output_dir) if cfg.output_dir else loaded.samples_dir / time.strftime("%Y-%m-%d_%H-%M-%S")
    check_free(_planned(out, jobs, suffixes, cfg.save_latents))
    engine.set_offload(cfg.offload)
    guider = cfg.get("guider")
    sampler = make_sampler(config, cfg.sampler, cfg.steps, cfg.cfg, guider, cfg.rescale)
    shape = latent_shape(engine, cfg.num_frames, cfg.height, cfg.width)
    low_res = read_low_res(cfg.lr_video, engine, shape) if cfg.lr_video else None
    multi = None
    if any(len(j.prompts) > 1 for j in jobs) and cfg.mode == "sample":
        multi = make_multi_prompt_sampler(config, cfg.steps, cfg.cfg, guider, cfg.rescale,
                                          **{k: cfg[k] for k in LAYOUT})
        multi.tile_size = multi.tile_size or shape[0]  # default: segments as long as the network's clips
        check_tiles(multi.tile_size, multi.overlap_size, engine.network.config.max_latent_frames)
    text_length = min(e.max_length for e in engine.conditioner.embedders if hasattr(e, "max_length"))
    for control in {j.control for j in jobs}:  # every control's options, windows and tokens, before any work
        engine.switch_adaln_layer(control, **control_options(cfg, control))
        engine.network.control.validate(engine.network.config.num_layers, cfg.steps)
        check_tokens(control_options(cfg, control), text_length)
    out.mkdir(parents=True, exist_ok=True)
    fps = 8 if cfg.fps is None else cfg.fps
    guidance = getattr(sampler.guider, "scale", None)

    def write(name: str, latent: torch.Tensor, video: torch.Tensor, job: Job, prompts: list[str], **extra) -> dict:
        files = write_video(out, name, video, fps, latent if cfg.save_latents else None)
        used = multi if len(prompts) > 1 and multi else sampler
        return {**files, "prompts": prompts, "seed": job.seed, "sampler": type(used).__name__, "steps": cfg.steps,
                "cfg": guidance, "guider": type(used.guider).__name__, "adaln": job.control, "mode": cfg.mode,
                "dtype": str(dtype).removeprefix("torch."), "fps": fps, "source": str(loaded.source), **extra}

    rows = []
    single = [j for j in jobs if len(j.prompts) == 1 and cfg.mode == "sample"]
    for start in range(0, len(single), cfg.batch_size):  # single-prompt videos, batched
        batch = single[start: start + cfg.batch_size]
        lr = None if low_res is None else low_res.expand(len(batch), -1, -1, -1, -1)
        latents = sample_latents(engine, sampler, [j.prompts[0] for j in batch], [j.seed for j in batch], shape, lr)
        decoded = engine.decode_video(latents)
        for j, job in enumerate(batch):
            rows.append(write(job.name, latents[j], decoded[j], job, job.prompts))
        log.info("%d / %d videos", len(rows), len(jobs))
    for job in (j for j in jobs if j not in single):
        engine.switch_adaln_layer(job.control, **control_options(cfg, job.control))
        generator = torch.Generator(device=device).manual_seed(job.seed)
        if cfg.mode == "sample":  # one long multi-prompt video
            conds, ucs = zip(*(engine.conditioning({k: [p] for k in text_keys(engine)}) for p in job.prompts))
            frames = multi.layout(len(job.prompts))[1]
            randn = torch.randn((1, frames, *shape[1:]), generator=torch.Generator().manual_seed(job.seed)).to(device)
            latent = engine.sample_multi_prompt(list(conds), list(ucs), randn, sampler=multi, generator=generator)
            rows.append(write(job.name, latent[0], engine.decode_video(latent)[0], job, job.prompts,
                              frames=int(latent.shape[1])))
        else:  # edit / reweight: [source, target] from the same noise
            cond, uc = engine.conditioning({k: job.prompts for k in text_keys(engine)})
            randn = torch.randn((1, *shape), generator=torch.Generator().manual_seed(job.seed)).to(device)
            latents = engine.sample_pair(cond, uc, randn, sampler=sampler, generator=generator)
            decoded = engine.decode_video(latents)
            for i, suffix in enumerate(suffixes):
                rows.append(write(f"{job.name}{suffix}", latents[i], decoded[i], job, [job.prompts[i]],
                                  role=("source", "target")[i]))
        log.info("%d / %d videos", len(rows), len(jobs) * len(suffixes))
    rows.sort(key=lambda r: r["file"])  # job order (single-prompt videos were sampled first, batched)
    write_jsonl(rows, out / "samples.jsonl")
    log.info("wrote %d videos and samples.jsonl to %s", len(rows), out)
    return out


def _planned(out: Path, jobs: list[Job], suffixes: list[str], latents: bool) -> list[Path]:
    names = [f"{j.name}{s}" for j in jobs for s in suffixes]
    return [out / "samples.jsonl"] + [out / f"{n}.mp4" for n in names] + \
        ([out / f"{n}.safetensors" for n in names] if latents else [])


def read_low_res(path: str, engine: VideoDiffusionEngine, shape) -> torch.Tensor:
    """A low-resolution clip, upsampled by lr_scale to the model's size: (1, T, 3, H, W) in [-1, 1]."""
    if not engine.lr_scale:
        raise ValueError("lr_video needs a model trained with lr_scale; this checkpoint's lr_scale is null")
    frames = torch.from_numpy(read_mp4(path)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, h, w)
    s = engine.first_stage_model.spatial_compression
    size = (shape[2] * s, shape[3] * s)
    if (frames.shape[2] * engine.lr_scale, frames.shape[3] * engine.lr_scale) != size:
        raise ValueError(f"lr_video={path} is {frames.shape[2]}x{frames.shape[3]}; with lr_scale={engine.lr_scale} "
                         f"it must be {size[0] // engine.lr_scale}x{size[1] // engine.lr_scale}")
    return torch.nn.functional.interpolate(frames, size=size, mode="bilinear", align_corners=False)[None]


@torch.no_grad()
def sample_latents(engine: VideoDiffusionEngine, sampler, prompts: list[str], seeds: list[int],
                   shape: tuple[int, int, int, int], low_res: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 latents `B T C H W` for one batch: prompt i from noise seeded by seeds[i]. `low_res` (B T C H W
    pixels at full size) conditions a super-resolution model."""
    device = engine.denoiser.alpha_cumprod_sqrt.device
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
