"""A sampling job end to end (`sample.py`'s body): check the options, plan the videos, load the model,
sample, decode and write the files and samples.jsonl."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from vdm.data.video_io import read_mp4
from vdm.diffusion.multi_prompt import check_tiles, segment_starts
from vdm.distributed import Processes
from vdm.engine import VideoDiffusionEngine
from vdm.errors import AlreadyExists, BadInput
from vdm.reproducible import warn_unless_pinned
from vdm.sampling.case_file import apply_case_file, is_case_file, read_case_file
from vdm.sampling.jobs import (
    Job,
    Unit,
    check_processes,
    check_tokens,
    control_options,
    owners,
    plan_jobs,
    plan_units,
    read_prompts,
)
from vdm.sampling.load import (
    check_rescale,
    check_source,
    latent_shape,
    load_model,
    make_multi_prompt_sampler,
    make_sampler,
    sampling_dtype,
    student_defaults,
)
from vdm.sampling.output import check_free, write_video
from vdm.sampling.progress import Progress, remove_leftovers

log = logging.getLogger(__name__)
LAYOUT = ("tile_size", "overlap_size", "num_transition_blocks", "longer_mid_segment", "reuse")


def sample(cfg: DictConfig, explicit: frozenset[str] = frozenset(), processes: Processes | None = None) -> Path:
    """Run the job `cfg` (conf/sample.yaml); returns the output folder. A reference case file given as
    `prompts_file` sets every option it states, except those in `explicit` (given on the command line).

    With several `processes` (every one calls this with the same arguments), the batches of single-prompt
    videos and the edit pairs are dealt among them and every multi-prompt video is split among them step by
    step; the files are those of one process, and rank 0 writes samples.jsonl once all are done."""
    processes = processes or Processes()
    warn_unless_pinned(log)  # resume=true and N processes promise the files of one uninterrupted process
    cfg = with_case_file(cfg, explicit)
    videos = read_prompts(cfg)
    if cfg.num_samples < 1 or cfg.batch_size < 1 or cfg.steps < 1:
        raise BadInput("num_samples, batch_size and steps must be >= 1")
    jobs = plan_jobs(cfg, videos)
    units = plan_units(jobs, cfg.mode, cfg.batch_size)
    check_processes(units, processes.world_size, cfg.batch_size)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    device = processes.device(device)
    dtype = sampling_dtype(cfg.dtype, device)
    check_rescale(cfg.rescale)
    if cfg.fps is not None and cfg.fps <= 0:
        raise BadInput(f"fps={cfg.fps} must be > 0")
    check_source(cfg.pretrained, cfg.checkpoint)
    if cfg.resume and not cfg.output_dir:
        raise BadInput("resume=true finishes the job in output_dir; give output_dir=<the interrupted job's folder>")
    recorded = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "resume"}  # as given

    if cfg.output_dir:  # checked now; a default folder is new (it is named by the time)
        progress = Progress(Path(cfg.output_dir))
        if progress.complete and cfg.resume:
            log.info("resume=true: %s holds a finished job (samples.jsonl); nothing to do", progress.out)
            return progress.out
        check_output(progress, jobs, cfg, recorded)
    loaded = load_model(cfg.pretrained, cfg.checkpoint, cfg.runs_root, cfg.use_ema, device, dtype, cfg.compile_model)
    cfg = student_defaults(cfg, loaded.distilled, explicit)  # a distilled student: its DDIM steps, no guidance
    engine, config = loaded.engine, loaded.config
    out = Path(cfg.output_dir) if cfg.output_dir else loaded.samples_dir / time.strftime("%Y-%m-%d_%H-%M-%S")
    if not cfg.output_dir:  # a given output_dir was checked before loading
        check_free(_planned(out, jobs, cfg))
    engine.set_offload(cfg.offload)
    guider = cfg.get("guider")
    sampler = make_sampler(config, cfg.sampler, cfg.steps, cfg.cfg, guider, cfg.rescale)
    if not processes.is_main:  # one progress bar, rank 0's
        sampler = replace(sampler, verbose=False)
    shape = latent_shape(engine, cfg.num_frames, cfg.height, cfg.width)
    low_res = read_low_res(cfg.lr_video, engine, shape) if cfg.lr_video else None
    multi = None
    if any(u.shared for u in units):
        multi = make_multi_prompt_sampler(config, cfg.steps, cfg.cfg, guider, cfg.rescale,
                                          **{k: cfg[k] for k in LAYOUT})
        multi = replace(multi, tile_size=multi.tile_size or shape[0],  # default: as long as the network's clips
                        processes=processes, verbose=multi.verbose and processes.is_main)
        check_tiles(multi.tile_size, multi.overlap_size, engine.network.config.max_latent_frames)
        check_pairs(multi, units, processes.world_size)
    text_length = min(e.max_length for e in engine.conditioner.embedders if hasattr(e, "max_length"))
    for control in {j.control for j in jobs}:  # every control's options, windows and tokens, before any work
        options = control_options(cfg, control, cfg.steps, out)
        engine.switch_adaln_layer(control, **options).validate(engine.network.config.num_layers, cfg.steps)
        check_tokens(options, text_length)

    out = processes.broadcast(out)  # a folder named by the time: rank 0's
    progress = Progress(out)
    processes.barrier()  # every process has checked the folder before rank 0 writes to it
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
        todo = [i for i, u in enumerate(units) if not progress.done(u.name)]
        if progress.interrupted:  # resume=true: a unit without its record is done again from the start
            remove_leftovers([path for i in todo for path in _leftovers(out, units[i], cfg)])
        progress.start(recorded)
        if len(todo) < len(units):
            log.info("resume=true: %d of %d units of work are done; sampling the other %d", len(units) - len(todo),
                     len(units), len(todo))
    todo = [units[i] for i in processes.broadcast(todo if processes.is_main else None)]

    def use(unit: Unit) -> dict:
        """Switch to the unit's control; the attention maps and masks it writes go to a folder named by
        its video (or range of videos)."""
        options = control_options(cfg, unit.jobs[0].control, cfg.steps, out, unit.name)
        engine.switch_adaln_layer(unit.jobs[0].control, **options)
        return options

    def write(name: str, latent: torch.Tensor, video: torch.Tensor, job: Job, prompts: list[str],
              options: dict, **extra) -> dict:
        fps = cfg.fps if cfg.fps is not None else (16 if job.multi else 8)  # the reference's defaults
        files = write_video(out, name, video, fps, latent if cfg.save_latents else None)
        used = multi if job.multi and "role" not in extra else sampler
        return {**files, "prompts": prompts, "seed": job.seed, "sampler": type(used).__name__, "steps": cfg.steps,
                "cfg": getattr(used.guider, "scale", None), "guider": type(used.guider).__name__, "adaln": job.control,
                "control_options": options, "mode": cfg.mode, "dtype": str(dtype).removeprefix("torch."),
                "fps": fps, "source": str(loaded.source), **extra}

    written = 0
    for unit, owner in zip(todo, owners(todo, processes.world_size)):
        if not unit.shared and owner != processes.rank:
            continue
        options = use(unit)
        rows = []
        if not unit.shared and cfg.mode == "sample":  # a batch of single-prompt videos
            batch = unit.jobs
            lr = None if low_res is None else low_res.expand(len(batch), -1, -1, -1, -1)
            latents = sample_latents(engine, sampler, [j.prompts[0] for j in batch], [j.seed for j in batch], shape,
                                     lr)
            decoded = engine.decode_video(latents)
            for j, job in enumerate(batch):
                rows.append(write(job.name, latents[j], decoded[j], job, job.prompts, options))
        elif unit.shared:  # one long multi-prompt video: every process samples, the owner writes
            (job,) = unit.jobs
            generator = torch.Generator(device=device).manual_seed(job.seed)
            conds, ucs = zip(*(engine.conditioning({k: [p] for k in text_keys(engine)}) for p in job.prompts))
            plan, frames = multi.layout(len(job.prompts))
            randn = torch.randn((1, frames, *shape[1:]), generator=torch.Generator().manual_seed(job.seed)).to(device)
            latent = engine.sample_multi_prompt(list(conds), list(ucs), randn, sampler=multi, generator=generator)
            if owner != processes.rank:
                continue
            layout = {"tile_size": multi.tile_size, "overlap_size": multi.overlap_size,
                      "num_transition_blocks": multi.num_transition_blocks,
                      "longer_mid_segment": multi.longer_mid_segment, "segments": len(plan), "reuse": multi.reuse}
            rows.append(write(job.name, latent[0], engine.decode_video(latent)[0], job, job.prompts, options,
                              frames=int(latent.shape[1]), layout=layout))
            if job.isolated:
                rows += isolated_videos(engine, sampler, multi, job, conds, ucs, randn, device, write)
        else:  # edit / reweight: [source, target] from the same noise
            (job,) = unit.jobs
            generator = torch.Generator(device=device).manual_seed(job.seed)
            cond, uc = engine.conditioning({k: job.prompts for k in text_keys(engine)})
            randn = torch.randn((1, *shape), generator=torch.Generator().manual_seed(job.seed)).to(device)
            latents = engine.sample_pair(cond, uc, randn, sampler=sampler, generator=generator)
            decoded = engine.decode_video(latents)
            for i, suffix in enumerate(("", "_target")):
                rows.append(write(f"{job.name}{suffix}", latents[i], decoded[i], job, [job.prompts[i]], options,
                                  role=("source", "target")[i]))
        progress.record(unit.name, rows)
        written += len(rows)
        log.info("%d videos written", written)
    engine.switch_adaln_layer("base")
    processes.barrier()  # every unit recorded; a process that died stops the others here
    if processes.is_main:
        progress.finish([u.name for u in units])
    return out


def check_output(progress: Progress, jobs: list[Job], cfg: DictConfig, options: dict) -> None:
    """A new job needs free file names; `resume=true` needs the interrupted job's own options."""
    if cfg.resume and progress.interrupted:
        progress.check_resumable(options)
        return
    if progress.interrupted:
        raise AlreadyExists(f"{progress.out} holds an interrupted job; resume=true finishes it (or choose "
                            "another output_dir)")
    check_free(_planned(progress.out, jobs, cfg))


def check_pairs(multi, units: list[Unit], world_size: int) -> None:
    """Each process of a multi-prompt video needs a pair of segments of its own."""
    for unit in (u for u in units if u.shared):
        segments = len(multi.layout(len(unit.jobs[0].prompts))[0])
        if segments - 1 < world_size:
            raise BadInput(f"{world_size} processes share a multi-prompt video of {segments} segments "
                           f"({segments - 1} pairs): launch at most {segments - 1} processes")


def _leftovers(out: Path, unit: Unit, cfg: DictConfig) -> list[Path]:
    """What an unfinished unit may have left in the output folder: its videos, latents and attention maps
    and the temporary files of a write cut short (masks saved under control.save_masks_dir are left alone:
    the redone passes go beside them)."""
    files = [p for p in _planned(out, unit.jobs, cfg) if p.name != "samples.jsonl"]
    temporary = [t for p in files for t in out.glob(f".{p.name}.*")]  # vdm.atomic's names
    return files + temporary + [out / "attn_map" / unit.name]


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
        raise BadInput("lr_video needs a model trained with lr_scale; this checkpoint's lr_scale is null")
    frames = torch.from_numpy(read_mp4(path)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, h, w)
    s = engine.first_stage_model.spatial_compression
    size = (shape[2] * s, shape[3] * s)
    if (frames.shape[2] * engine.lr_scale, frames.shape[3] * engine.lr_scale) != size:
        raise BadInput(f"lr_video={path} is {frames.shape[2]}x{frames.shape[3]}; with lr_scale={engine.lr_scale} "
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
