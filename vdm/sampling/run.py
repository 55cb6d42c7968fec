"""A sampling job end to end (`sample.py`'s body): check the options, plan the videos, load the model,
sample, decode and write the files and samples.jsonl."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from vdm.data.video_io import read_mp4
from vdm.diffusion.multi_prompt import check_tiles, segment_starts
from vdm.engine import VideoDiffusionEngine
from vdm.sampling.case_file import apply_case_file, is_case_file, read_case_file
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


def sample(cfg: DictConfig, explicit: frozenset[str] = frozenset()) -> Path:
    """Run the job `cfg` (conf/sample.yaml); returns the output folder. A reference case file given as
    `prompts_file` sets every option it states, except those in `explicit` (given on the command line)."""
    cfg = with_case_file(cfg, explicit)
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

    if cfg.output_dir:  # checked now; a default folder is new (it is named by the time)
        check_free(_planned(Path(cfg.output_dir), jobs, cfg))
    loaded = load_model(cfg.pretrained, cfg.checkpoint, cfg.runs_root, cfg.use_ema, device, dtype, cfg.compile_model)
    engine, config = loaded.engine, loaded.config
    out = Path(cfg.output_dir) if cfg.output_dir else loaded.samples_dir / time.strftime("%Y-%m-%d_%H-%M-%S")
    if not cfg.output_dir:  # a given output_dir was checked before loading
        check_free(_planned(out, jobs, cfg))
    engine.set_offload(cfg.offload)
    guider = cfg.get("guider")
    sampler = make_sampler(config, cfg.sampler, cfg.steps, cfg.cfg, guider, cfg.rescale)
    shape = latent_shape(engine, cfg.num_frames, cfg.height, cfg.width)
    low_res = read_low_res(cfg.lr_video, engine, shape) if cfg.lr_video else None
    multi = None
    if any(_is_multi(j, cfg) for j in jobs):
        multi = make_multi_prompt_sampler(config, cfg.steps, cfg.cfg, guider, cfg.rescale,
                                          **{k: cfg[k] for k in LAYOUT})
        multi = replace(multi, tile_size=multi.tile_size or shape[0])  # default: as long as the network's clips
        check_tiles(multi.tile_size, multi.overlap_size, engine.network.config.max_latent_frames)
    text_length = min(e.max_length for e in engine.conditioner.embedders if hasattr(e, "max_length"))
    for control in {j.control for j in jobs}:  # every control's options, windows and tokens, before any work
        options = control_options(cfg, control, cfg.steps, out)
        engine.switch_adaln_layer(control, **options).validate(engine.network.config.num_layers, cfg.steps)
        check_tokens(options, text_length)
    out.mkdir(parents=True, exist_ok=True)
    guidance = getattr(sampler.guider, "scale", None)

    def use(batch: list[Job]) -> dict:
        """Switch to the batch's control; the attention maps and masks it writes go to a folder named by
        its video (or range of videos)."""
        folder = batch[0].name if len(batch) == 1 else f"{batch[0].name}-{batch[-1].name}"
        options = control_options(cfg, batch[0].control, cfg.steps, out, folder)
        engine.switch_adaln_layer(batch[0].control, **options)
        return options

    def write(name: str, latent: torch.Tensor, video: torch.Tensor, job: Job, prompts: list[str],
              options: dict, **extra) -> dict:
        fps = cfg.fps if cfg.fps is not None else (16 if _is_multi(job, cfg) else 8)  # the reference's defaults
        files = write_video(out, name, video, fps, latent if cfg.save_latents else None)
        used = multi if _is_multi(job, cfg) and "role" not in extra else sampler
        return {**files, "prompts": prompts, "seed": job.seed, "sampler": type(used).__name__, "steps": cfg.steps,
                "cfg": guidance, "guider": type(used.guider).__name__, "adaln": job.control,
                "control_options": options, "mode": cfg.mode, "dtype": str(dtype).removeprefix("torch."),
                "fps": fps, "source": str(loaded.source), **extra}

    rows = []
    single = [j for j in jobs if len(j.prompts) == 1 and cfg.mode == "sample"]
    for control in dict.fromkeys(j.control for j in single):  # single-prompt videos, batched per control
        group = [j for j in single if j.control == control]
        for start in range(0, len(group), cfg.batch_size):
            batch = group[start: start + cfg.batch_size]
            options = use(batch)
            lr = None if low_res is None else low_res.expand(len(batch), -1, -1, -1, -1)
            latents = sample_latents(engine, sampler, [j.prompts[0] for j in batch], [j.seed for j in batch], shape,
                                     lr)
            decoded = engine.decode_video(latents)
            for j, job in enumerate(batch):
                rows.append(write(job.name, latents[j], decoded[j], job, job.prompts, options))
            log.info("%d videos written", len(rows))
    for job in (j for j in jobs if j not in single):
        options = use([job])
        generator = torch.Generator(device=device).manual_seed(job.seed)
        if cfg.mode == "sample":  # one long multi-prompt video
            conds, ucs = zip(*(engine.conditioning({k: [p] for k in text_keys(engine)}) for p in job.prompts))
            plan, frames = multi.layout(len(job.prompts))
            randn = torch.randn((1, frames, *shape[1:]), generator=torch.Generator().manual_seed(job.seed)).to(device)
            latent = engine.sample_multi_prompt(list(conds), list(ucs), randn, sampler=multi, generator=generator)
            layout = {"tile_size": multi.tile_size, "overlap_size": multi.overlap_size,
                      "num_transition_blocks": multi.num_transition_blocks,
                      "longer_mid_segment": multi.longer_mid_segment, "segments": len(plan), "reuse": multi.reuse}
            rows.append(write(job.name, latent[0], engine.decode_video(latent)[0], job, job.prompts, options,
                              frames=int(latent.shape[1]), layout=layout))
            if job.isolated:
                rows += isolated_videos(engine, sampler, multi, job, conds, ucs, randn, device, write)
        else:  # edit / reweight: [source, target] from the same noise
            cond, uc = engine.conditioning({k: job.prompts for k in text_keys(engine)})
            randn = torch.randn((1, *shape), generator=torch.Generator().manual_seed(job.seed)).to(device)
            latents = engine.sample_pair(cond, uc, randn, sampler=sampler, generator=generator)
            decoded = engine.decode_video(latents)
            for i, suffix in enumerate(("", "_target")):
                rows.append(write(f"{job.name}{suffix}", latents[i], decoded[i], job, [job.prompts[i]], options,
                                  role=("source", "target")[i]))
        log.info("%d videos written", len(rows))
    engine.switch_adaln_layer("base")
    rows.sort(key=lambda r: r["file"])  # job order (single-prompt videos were sampled first, batched)
    write_jsonl(rows, out / "samples.jsonl")
    log.info("wrote %d videos and samples.jsonl to %s", len(rows), out)
    return out


def isolated_videos(engine: VideoDiffusionEngine, sampler, multi, job: Job, conds, ucs, randn: torch.Tensor,
                    device, write) -> list[dict]:
    """is_run_isolated (the reference's comparison): each prompt's own single-prompt video, sampled with
    plain attention from the noise of its first segment of the long latent, and all of them in a row."""
    plan, _ = multi.layout(len(job.prompts))
    starts = segment_starts(len(plan), multi.tile_size, multi.overlap_size)
    engine.switch_adaln_layer("base")
    rows, clips = [], []
    for i, prompt in enumerate(job.prompts):
        k = next(k for k, seg in enumerate(plan) if seg.a == seg.b == i)  # the prompt's first own segment
        noise = randn[:, starts[k]: starts[k] + multi.tile_size]
        generator = torch.Generator(device=device).manual_seed(job.seed)
        latent = engine.sample_single(conds[i], ucs[i], noise, sampler=sampler, generator=generator)
        video = engine.decode_video(latent)[0]
        clips.append(video)
        rows.append(write(f"{job.name}_isolated_{i}", latent[0], video, job, [prompt], {}, role="isolated",
                          adaln="base", segment=k))
    rows.append(write(f"{job.name}_isolated_all", None, torch.cat(clips), job, list(job.prompts), {},
                      role="isolated_all", adaln="base"))
    return rows


def with_case_file(cfg: DictConfig, explicit: frozenset[str]) -> DictConfig:
    """`prompts_file=<case>.yaml` in the reference's format: its options over the defaults."""
    if cfg.prompts_file is None or not is_case_file(cfg.prompts_file):
        return cfg
    case = read_case_file(cfg.prompts_file)
    if case.ignored:
        log.info("%s: ignored keys of the reference's own runtime: %s", case.path, ", ".join(case.ignored))
    cfg = apply_case_file(cfg, case, explicit)
    with open_dict(cfg):
        cfg.prompts_file = None  # the prompts are the case's now
    return cfg


def _is_multi(job: Job, cfg: DictConfig) -> bool:
    return len(job.prompts) > 1 and cfg.mode == "sample"


def _planned(out: Path, jobs: list[Job], cfg: DictConfig) -> list[Path]:
    names, videos_only = [], []
    for j in jobs:
        names += [j.name] if cfg.mode == "sample" else [j.name, f"{j.name}_target"]
        if j.isolated:
            names += [f"{j.name}_isolated_{i}" for i in range(len(j.prompts))]
            videos_only.append(f"{j.name}_isolated_all")
    return [out / "samples.jsonl"] + [out / f"{n}.mp4" for n in names + videos_only] + \
        ([out / f"{n}.safetensors" for n in names] if cfg.save_latents else [])


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
    # one generator per video: its SDE noise depends on its seed alone, not on the batch it landed in
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    return engine.sample_single(cond, uc, randn, sampler=sampler, generator=generators)


def text_keys(engine: VideoDiffusionEngine) -> list[str]:
    """The batch keys the conditioner reads (its embedders' input keys)."""
    return [e.input_key for e in engine.conditioner.embedders]
