"""A sampling job end to end (`sample.py`'s body): check the options, plan the videos, load the model,
sample, decode and write the files and samples.jsonl."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from vdm.build import config_variant
from vdm.conditioning.image import INPUT_KEY as IMAGE_KEY
from vdm.conditioning.image import layout as image_layout
from vdm.conditioning.image import read_image
from vdm.conditioning.low_resolution import INPUT_KEY as LOW_RESOLUTION_KEY
from vdm.data.video_io import read_mp4
from vdm.diffusion.multi_prompt import segment_starts
from vdm.diffusion.samplers import GridSampler
from vdm.distributed import Processes, VideoProcesses
from vdm.engine import VideoDiffusionEngine
from vdm.errors import AlreadyExists, BadInput
from vdm.networks.attention_control import AttentionControl
from vdm.networks.caches import StepCache, make_cache
from vdm.networks.controls import CONTROLS
from vdm.reproducible import warn_unless_pinned
from vdm.sampling import gallery
from vdm.sampling.case_file import apply_case_file, is_case_file, read_case_file
from vdm.sampling.inversion import InversionEdit, check_edit_input, psnr
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
    LoadedModel,
    check_rescale,
    check_source,
    latent_shape,
    load_model,
    make_multi_prompt_sampler,
    make_sampler,
    sampling_dtype,
    student_defaults,
)
from vdm.sampling.output import check_free, web_copies, write_video
from vdm.sampling.parallel import check_guidance, check_heads, check_parallel, video_processes
from vdm.sampling.progress import Progress, remove_leftovers

log = logging.getLogger(__name__)
LAYOUT = ("tile_size", "overlap_size", "num_transition_blocks", "longer_mid_segment", "reuse")


@dataclass
class Plan:
    """What a job makes, checked before anything loads: the options (a case file applied), its videos as jobs
    and units of work, where and in which dtype they are sampled, and the options recorded with the output."""

    cfg: DictConfig
    jobs: list[Job]
    units: list[Unit]
    device: torch.device
    dtype: torch.dtype
    recorded: dict
    finished: Path | None = None  # resume=true on a folder whose job is complete: nothing to do


@dataclass
class Session:
    """The loaded model and everything each unit of work samples with."""

    cfg: DictConfig
    processes: Processes
    loaded: LoadedModel
    sampler: GridSampler
    multi: GridSampler | None  # the multi-prompt sampler, when a unit is a long video
    shape: tuple[int, int, int, int]  # latent T C H W
    low_res: torch.Tensor | None  # lr_video (1, T, 3, h, w), 1/lr_scale of the model's size
    images: dict | None  # image-to-video: each video's image (path -> (1, 3, H, W) in [-1, 1] at the video's size)
    video: torch.Tensor | None  # video= (1, F, 3, H, W) in [-1, 1], for video-to-video
    out: Path
    dtype: torch.dtype
    progress: Progress | None = None  # the output folder's record of done units, once opened
    cache: Callable[[], StepCache] | None = None  # cache=: a fresh step cache for each video
    mesh: VideoProcesses = VideoProcesses()  # how the processes share a video (cfg_parallel, ulysses)
    inversion: InversionEdit | None = None  # mode=edit|reweight video=: the edit's DDIM samplers

    @property
    def sequence(self) -> Processes:
        """The processes a video's tokens are split over (ulysses)."""
        return self.mesh.sequence

    @property
    def engine(self) -> VideoDiffusionEngine:
        return self.loaded.engine

    @property
    def device(self) -> torch.device:
        return self.engine.denoiser.alpha_cumprod_sqrt.device


@dataclass(frozen=True)
class VideoRecord:
    """One row of samples.jsonl: a written video and how it was made."""

    files: dict  # {"file": <name>.mp4, ["latent": <name>.safetensors]}
    prompts: list[str]
    seed: int
    sampler: str
    steps: int
    cfg: float | None
    guider: str
    control: str
    control_options: dict
    mode: str
    dtype: str
    fps: float
    source: str
    frames: int | None = None  # a multi-prompt video: its latent frames and layout
    layout: dict | None = None
    role: str | None = None  # source / target of a pair; isolated / isolated_all
    segment: int | None = None  # an isolated prompt's segment
    inputs: dict | None = None  # image-to-video: {"image"}; video-to-video: {"video", "strength"}
    lora: str | None = None  # lora=: the diffusers LoRA over the model
    cache: dict | None = None  # cache=: its name and options, the steps it computed and the blocks it ran

    def row(self) -> dict:
        fields = ("prompts", "seed", "sampler", "steps", "cfg", "guider", "control", "control_options", "mode",
                  "dtype", "fps", "source")
        optional = {k: getattr(self, k) for k in ("frames", "layout", "role", "segment", "inputs", "lora", "cache")}
        return {**self.files, **{k: getattr(self, k) for k in fields},
                **{k: v for k, v in optional.items() if v is not None}}


def sample(cfg: DictConfig, explicit: frozenset[str] = frozenset(), processes: Processes | None = None) -> Path:
    """Run the job `cfg` (conf/sample.yaml); returns the output folder. A reference case file given as
    `prompts_file` sets every option it states, except those in `explicit` (given on the command line).

    With several `processes` (every one calls this with the same arguments), the batches of single-prompt
    videos and the edit pairs are dealt among them and every multi-prompt video is split among them step by
    step; the files are those of one process, and rank 0 writes samples.jsonl once all are done."""
    processes = processes or Processes()
    warn_unless_pinned(log)  # resume=true and N processes promise the files of one uninterrupted process
    plan = plan_job(cfg, explicit, processes)
    if plan.finished is not None:
        return plan.finished
    session = load_session(plan, explicit, processes)
    todo = start_output(session, plan)
    written = 0
    groups = session.mesh.units  # the groups of processes that sample a video together (cfg_parallel, ulysses)
    for unit, owner in zip(todo, owners(todo, groups.world_size)):
        if not unit.shared and owner != groups.rank:
            continue
        kind = sample_batch if not unit.shared and session.cfg.mode == "sample" else \
            sample_long_video if unit.shared else sample_pair
        records = kind(session, unit, writes=owner == groups.rank and session.mesh.writes)
        if records is None:  # a video another process of the job writes
            continue
        session.progress.record(unit.name, [r.row() for r in records])
        gallery.update(session.out, session.cfg.video_format, [r.row() for r in records])  # index.html, web copies
        written += len(records)
        log.info("%d videos written", written)
    processes.barrier()  # every unit recorded; a process that died stops the others here
    if processes.is_main:
        session.progress.finish([u.name for u in plan.units])
        gallery.update(session.out, session.cfg.video_format)
    return session.out


def plan_job(cfg: DictConfig, explicit: frozenset[str], processes: Processes) -> Plan:
    """The job's options checked, its videos planned and a given output folder checked, before any load."""
    cfg = with_case_file(cfg, explicit)
    videos = read_prompts(cfg)
    if cfg.num_samples < 1 or cfg.batch_size < 1 or cfg.steps < 1:
        raise BadInput("num_samples, batch_size and steps must be >= 1")
    jobs = plan_jobs(cfg, videos)
    units = plan_units(jobs, cfg.mode, cfg.batch_size)
    groups = check_parallel(cfg, units, processes)  # the groups of processes that share a video
    check_processes(units, groups, cfg.batch_size)
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
    plan = Plan(cfg, jobs, units, device, dtype, recorded)
    if cfg.output_dir:  # checked now; a default folder is new (it is named by the time)
        progress = Progress(Path(cfg.output_dir))
        if progress.complete and cfg.resume:
            log.info("resume=true: %s holds a finished job (samples.jsonl); nothing to do", progress.out)
            return replace(plan, finished=progress.out)
        check_output(progress, jobs, cfg, recorded)
    return plan


def load_session(plan: Plan, explicit: frozenset[str], processes: Processes) -> Session:
    """Load the model, build the samplers and check every control against it, before any work."""
    cfg, units = plan.cfg, plan.units
    loaded = load_model(cfg.pretrained, cfg.checkpoint, cfg.runs_root, cfg.use_ema, plan.device, plan.dtype,
                        cfg.compile_model, cfg.get("lora"))
    cfg = student_defaults(cfg, loaded.distilled, explicit)  # a distilled student: its DDIM steps, no guidance
    engine, config = loaded.engine, loaded.config
    out = Path(cfg.output_dir) if cfg.output_dir else loaded.samples_dir / time.strftime("%Y-%m-%d_%H-%M-%S")
    if not cfg.output_dir:  # a given output_dir was checked before loading
        check_free(_planned(out, plan.jobs, cfg))
    engine.set_offload(cfg.offload)
    guider = cfg.get("guider")
    sampler = make_sampler(config, cfg.sampler, cfg.steps, cfg.cfg, guider, cfg.rescale)
    if not processes.is_main:  # one progress bar, rank 0's
        sampler = replace(sampler, verbose=False)
    frames = read_input_video(cfg, engine, units) if cfg.video else None
    shape = latent_shape(engine, cfg.num_frames if frames is None else len(frames), cfg.height, cfg.width)
    low_res = read_low_res(cfg.lr_video, engine, shape) if cfg.lr_video else None
    images = check_image_input(cfg, engine, units, shape)
    video = None if frames is None else input_video(frames, engine, shape)
    check_guidance(cfg, sampler.guider)
    check_heads(cfg, engine.network.config.num_attention_heads)
    mesh = video_processes(cfg, processes)
    if cfg.get("cfg_parallel"):
        sampler = replace(sampler, branches=mesh.branches)
    inversion = None
    if video is not None and cfg.mode != "sample":  # an edit of the user's video
        check_edit_input(cfg, explicit)
        inversion = InversionEdit.of(cfg, sampler)
    multi = None
    if any(u.shared for u in units):
        multi = make_multi_prompt_sampler(config, cfg.steps, cfg.cfg, guider, cfg.rescale,
                                          **{k: cfg[k] for k in LAYOUT})
        multi = engine.multi_prompt_sampler(multi, frames=shape[0])  # default tile: as long as the job's clips
        multi = replace(multi, processes=mesh.peers, verbose=multi.verbose and processes.is_main)
        check_pairs(multi, units, mesh.peers.world_size)
    set_text_length(engine, cfg.text_length)
    text_length = min(e.max_length for e in engine.conditioner.embedders if hasattr(e, "max_length"))
    for control in {j.control for j in plan.jobs}:  # every control's options, windows and tokens
        options = control_options(cfg, control, cfg.steps, out, num_layers=engine.network.config.num_layers)
        engine.switch_adaln_layer(control, **options).validate(engine.network.config.num_layers, cfg.steps)
        check_tokens(options, text_length)
    cache = step_cache(cfg, loaded, units, shape, video is not None, mesh.video)
    return Session(cfg, processes, loaded, sampler, multi, shape, low_res, images, video, processes.broadcast(out),
                   plan.dtype, cache=cache, mesh=mesh, inversion=inversion)


def step_cache(cfg: DictConfig, loaded: LoadedModel, units: list[Unit], shape, video_input: bool,
               group: Processes):
    """`cache=`: a maker of fresh step caches (one per video, deciding alike on the `group` of processes that
    sample it), checked against the job; None without a cache. The TeaCache coefficients default to the
    published ones of the model's variant (a CogVideoX folder, or a run trained from one)."""
    options = cfg.get("cache")
    if not options:
        return None
    options = OmegaConf.to_container(options, resolve=True)
    name = options.pop("name", None)
    windowed = [u.jobs[0].control for u in units if u.shared and u.jobs[0].control != "base"]
    if windowed and cfg.get("reuse") is not False:  # reuse: null is the sampler's default, true
        raise BadInput(f"cache={name} on a multi-prompt video under control {windowed[0]} needs reuse=false: with "
                       "reuse=true its segment passes change between segments and pairs at the window's edges")
    seeing = [j.control for u in units for j in u.jobs if CONTROLS[j.control].reads_attention]
    if seeing:
        raise BadInput(f"cache={name} cannot skip the steps a control must see ({seeing[0]}: it reads every step's "
                       "attention): sample it without cache=")
    config = loaded.config
    variant = config_variant(config) if config.get("pretrained") else None
    steps = int(cfg.steps * cfg.strength) if video_input and cfg.mode == "sample" else cfg.steps
    num_layers = loaded.engine.network.config.num_layers
    make_cache(name, options, num_layers, steps, variant)  # its options checked before any work
    return partial(make_cache, name, options, num_layers, steps, variant, group)


def start_output(session: Session, plan: Plan) -> list[Unit]:
    """Open the output folder (rank 0's name for it) and return the units still to do: all of a new job; of
    an interrupted one (resume=true), those without their record, whose leftover files are removed first."""
    processes, out, units = session.processes, session.out, plan.units
    session.progress = progress = Progress(out)
    processes.barrier()  # every process has checked the folder before rank 0 writes to it
    todo = None
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
        todo = [i for i, u in enumerate(units) if not progress.done(u.name)]
        if progress.interrupted:  # resume=true: a unit without its record is done again from the start
            remove_leftovers([path for i in todo for path in _leftovers(out, units[i], session.cfg)])
        progress.start(plan.recorded)
        if len(todo) < len(units):
            log.info("resume=true: %d of %d units of work are done; sampling the other %d", len(units) - len(todo),
                     len(units), len(todo))
    return [units[i] for i in processes.broadcast(todo)]


# -- the kinds of unit: each samples, decodes and writes its videos, and returns their records -------------

def unit_control(session: Session, unit: Unit) -> tuple[AttentionControl, dict]:
    """The unit's control and its options; the attention maps and masks it writes go to a folder named by
    its video (or range of videos)."""
    cfg = session.cfg
    options = control_options(cfg, unit.jobs[0].control, cfg.steps, session.out, unit.name,
                              session.engine.network.config.num_layers)
    return session.engine.switch_adaln_layer(unit.jobs[0].control, **options), options


def write(session: Session, name: str, latent: torch.Tensor | None, video: torch.Tensor, job: Job,
          prompts: list[str], options: dict, sampler: GridSampler, **extra) -> VideoRecord:
    """`<name>.mp4` (and its latent with save_latents=true) and the record of how it was made."""
    cfg = session.cfg
    per_second = 16 if job.multi or session.engine.network.config.patch_size_t else 8  # DiTCtrl, 1.5: 16; 1.0: 8
    fps = cfg.fps if cfg.fps is not None else per_second
    files = write_video(session.out, name, video, fps, latent if cfg.save_latents else None)
    if session.images is not None:
        extra.setdefault("inputs", {"image": job.image})
    if session.video is not None:
        extra.setdefault("inputs", {"video": str(cfg.video), "strength": cfg.strength})
    if cfg.get("lora"):
        extra.setdefault("lora", str(cfg.lora))
    return VideoRecord(files, prompts, job.seed, type(sampler).__name__, cfg.steps,
                       getattr(sampler.guider, "scale", None), type(sampler.guider).__name__,
                       extra.pop("control", job.control), options, cfg.mode, str(session.dtype).removeprefix("torch."),
                       fps, str(session.loaded.source), **extra)


def sample_batch(session: Session, unit: Unit, writes: bool = True) -> list[VideoRecord]:
    """A batch of single-prompt videos, each from its own seed."""
    (control, options), engine, batch = unit_control(session, unit), session.engine, unit.jobs
    low_res = None if session.low_res is None else session.low_res.expand(len(batch), -1, -1, -1, -1)
    start = None if session.video is None else (session.video, session.cfg.strength)
    images = None if session.images is None else [session.images[j.image] for j in batch]
    caches = [] if session.cache is None else [session.cache() for _ in batch]
    if caches:  # a cache decides per video: each samples alone
        latents = torch.cat([sample_latents(engine, session.sampler, [job.prompts[0]], [job.seed], session.shape,
                                            None if low_res is None else low_res[j:j + 1], control,
                                            None if images is None else images[j:j + 1], start, caches[j],
                                            session.sequence)
                             for j, job in enumerate(batch)])
    else:
        latents = sample_latents(engine, session.sampler, [j.prompts[0] for j in batch], [j.seed for j in batch],
                                 session.shape, low_res, control, images, start, sequence=session.sequence)
    if not writes:  # cfg_parallel, ulysses: another process of the group decodes and writes these videos
        return None
    latents = engine.decodable(latents) if start is None else latents[:, latents.shape[1] - input_latents(session):]
    decoded = engine.decode_video(latents)
    return [write(session, job.name, latents[j], decoded[j], job, job.prompts, options, session.sampler,
                  **({"cache": cache_record(session.cfg, caches[j])} if caches else {}))
            for j, job in enumerate(batch)]


def cache_record(cfg: DictConfig, cache: StepCache) -> dict:
    """What samples.jsonl says of a video's step cache."""
    return {**OmegaConf.to_container(cfg.cache, resolve=True), **cache.counts()}


def sample_long_video(session: Session, unit: Unit, writes: bool) -> list[VideoRecord] | None:
    """One long multi-prompt video: every process samples its share of each step; the owner (`writes`)
    decodes and writes it (and with is_run_isolated each prompt's own video). None for the other processes."""
    (control, options), engine, multi = unit_control(session, unit), session.engine, session.multi
    (job,) = unit.jobs
    plan, frames = multi.layout(len(job.prompts))
    image = None if session.images is None else session.images[job.image]
    randn, image_latent = seeded_start((1, frames, *session.shape[1:]), job.seed, session.device,
                                       image_encoder(engine, image))
    extra, first = {}, None
    if image_latent is not None:  # image-to-video: the first segment takes the image, the others the zero latent
        zeros = image_latent.new_zeros(1, multi.tile_size, *image_latent.shape[2:])
        extra, first = {IMAGE_KEY: zeros}, {"concat": image_layout(image_latent, multi.tile_size)}
    conds, ucs = zip(*(engine.conditioning({**{k: [p] for k in text_keys(engine)}, **extra}) for p in job.prompts))
    stats = {}
    latent = engine.sample_multi_prompt(list(conds), list(ucs), randn, sampler=multi, stats=stats,
                                        generator=seeded_generator(job.seed, session.device), control=control,
                                        first_segment=first, sequence=session.sequence, cache=session.cache)
    latent = engine.decodable(latent)
    if not writes:
        return None
    layout = {"tile_size": multi.tile_size, "overlap_size": multi.overlap_size,
              "num_transition_blocks": multi.num_transition_blocks, "longer_mid_segment": multi.longer_mid_segment,
              "segments": len(plan), "reuse": multi.reuse}
    cached = {} if session.cache is None else {"cache": {**OmegaConf.to_container(session.cfg.cache, resolve=True),
                                                          **stats["cache"]}}  # summed over the segment passes
    records = [write(session, job.name, latent[0], engine.decode_video(latent)[0], job, job.prompts, options, multi,
                     frames=int(latent.shape[1]), layout=layout, **cached)]
    if job.isolated:
        records += isolated_videos(session, job, conds, ucs, randn, first)
    return records


def sample_pair(session: Session, unit: Unit, writes: bool = True) -> list[VideoRecord]:
    """An edit (mode=edit) or reweight (mode=reweight) pair: [source, target] from the same noise."""
    (control, options), engine = unit_control(session, unit), session.engine
    (job,) = unit.jobs
    image = None if session.images is None else session.images[job.image]
    randn, image_latent = seeded_start((1, *session.shape), job.seed, session.device, image_encoder(engine, image))
    batch = {k: job.prompts for k in text_keys(engine)}
    if image_latent is not None:  # image-to-video: both rows take the image
        batch[IMAGE_KEY] = image_layout(image_latent, session.shape[0]).expand(2, -1, -1, -1, -1)
    cond, uc = engine.conditioning(batch)
    cache = None if session.cache is None else session.cache()  # one for the pair: its rows share each decision
    if session.inversion is not None:  # the user's video inverted under the source prompt, then the pair
        return edit_video(session, job, cond, uc, control, options, cache, writes)
    latents = engine.decodable(engine.sample_pair(cond, uc, randn, sampler=session.sampler,
                                                  generator=seeded_generator(job.seed, session.device),
                                                  control=control, cache=cache, sequence=session.sequence))
    if not writes:  # ulysses: another process of the group decodes and writes the pair
        return None
    decoded = engine.decode_video(latents)
    extra = {} if cache is None else {"cache": cache_record(session.cfg, cache)}
    return [write(session, f"{job.name}{suffix}", latents[i], decoded[i], job, [job.prompts[i]], options,
                  session.sampler, role=("source", "target")[i], **extra) for i, suffix in enumerate(("", "_target"))]


def edit_video(session: Session, job: Job, cond: dict, uc: dict, control: AttentionControl, options: dict,
               cache: StepCache | None, writes: bool) -> list[VideoRecord] | None:
    """An edit pair of `video=`: the source row reconstructs the video (its PSNR against the input is recorded),
    the target row is the edit."""
    engine, edit = session.engine, session.inversion
    latents = edit.edit(engine, cond, uc, session.video, job.seed, control, cache, session.sequence)
    if not writes:
        return None
    latents = latents[:, latents.shape[1] - input_latents(session):]  # 1.5: the padding copy dropped
    decoded = engine.decode_video(latents)
    inputs = {"video": str(session.cfg.video), "inversion": edit.options}
    extra = {} if cache is None else {"cache": cache_record(session.cfg, cache)}
    reconstruction = {"reconstruction_psnr": round(psnr(decoded[0], session.video[0]), 3)}
    return [write(session, f"{job.name}{suffix}", latents[i], decoded[i], job, [job.prompts[i]], options,
                  edit.recorded[i], role=("source", "target")[i], inputs={**inputs, **(reconstruction if i == 0 else {})},
                  **extra) for i, suffix in enumerate(("", "_target"))]


def input_latents(session: Session) -> int:
    """Video-to-video: the input video's latent count, which is decoded (CogVideoX 1.5: the odd count was sampled
    behind a copy of its first latent, vdm's rule; diffusers' CogVideoXVideoToVideoPipeline refuses odd counts and
    decodes an even one whole, into r·T frames)."""
    return (session.video.shape[1] - 1) // session.engine.first_stage_model.temporal_compression + 1


def seeded_noise(shape: tuple[int, ...], seed: int, device) -> torch.Tensor:
    """The initial noise of a video seeded by `seed`, drawn on the CPU (the same on every device)."""
    return seeded_start(shape, seed, device)[0]


def seeded_start(shape: tuple[int, ...], seed: int, device, encode=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the initial noise, `encode(generator)` or None) of a video seeded by `seed`: one CPU generator draws the
    input's posterior sample first (an image's or a video's latent) and then the noise, as diffusers'
    image-to-video and video-to-video pipelines do."""
    generator = torch.Generator().manual_seed(seed)
    latent = None if encode is None else encode(generator)
    return torch.randn(shape, generator=generator).to(device), latent


def image_encoder(engine: VideoDiffusionEngine, image: torch.Tensor | None):
    """What `seeded_start` encodes for an image-to-video video (None: nothing)."""
    return None if image is None else partial(engine.encode_image, image)


def read_input_video(cfg: DictConfig, engine: VideoDiffusionEngine, units: list[Unit]) -> np.ndarray:
    """`video=`'s frames (F, H, W, 3) uint8, checked for video-to-video: a text-to-video model, single-prompt
    sampling, strength in (0, 1] keeping at least one step, whole latent frames (`num_frames`: its first ones)."""
    r = engine.first_stage_model.temporal_compression
    if cfg.mode == "sample":
        if not 0 < cfg.strength <= 1:
            raise BadInput(f"strength={cfg.strength} must be in (0, 1] (1: from pure noise)")
        if int(cfg.steps * cfg.strength) < 1:
            raise BadInput(f"strength={cfg.strength} keeps int({cfg.steps} * {cfg.strength}) = 0 of the {cfg.steps} "
                           "steps; raise strength or steps")
    if engine.image_to_video and cfg.mode == "sample":
        raise BadInput(f"video={cfg.video}: video-to-video takes a text-to-video model (as diffusers' "
                       "CogVideoXVideoToVideoPipeline); this one is image-to-video")
    if engine.image_to_video:
        raise BadInput(f"video={cfg.video} with mode={cfg.mode}: editing a video takes a text-to-video model (an "
                       "image-to-video model conditions both rows on one first frame, which the edit must change)")
    if any(u.shared for u in units):
        raise BadInput("video= samples single-prompt videos (video-to-video) or edits them (mode=edit|reweight); "
                       "a multi-prompt video from a video is not supported")
    frames = read_mp4(cfg.video)
    if cfg.num_frames is not None:
        if len(frames) < cfg.num_frames:
            raise BadInput(f"video={cfg.video} has {len(frames)} frames; num_frames={cfg.num_frames} needs as many")
        frames = frames[:cfg.num_frames]
    most = (engine.network.config.max_latent_frames - 1) * r + 1
    if len(frames) > most:
        raise BadInput(f"video={cfg.video} has {len(frames)} frames; the model takes at most {most} (give "
                       f"num_frames={most} to use its first ones)")
    if (len(frames) - 1) % r:
        keep = (len(frames) - 1) // r * r + 1
        raise BadInput(f"video={cfg.video} has {len(frames)} frames; the VAE takes {r}k+1 (give num_frames={keep} "
                       "to use its first ones)")
    return frames


def input_video(frames: np.ndarray, engine: VideoDiffusionEngine, shape) -> torch.Tensor:
    """The frames at the video's size (each Lanczos-resized when it differs, as diffusers' VideoProcessor does),
    as (1, F, 3, H, W) in [-1, 1] on the model's device."""
    from PIL import Image

    s = engine.first_stage_model.spatial_compression
    H, W = shape[2] * s, shape[3] * s
    if frames.shape[1:3] != (H, W):
        frames = np.stack([np.asarray(Image.fromarray(f).resize((W, H), resample=Image.LANCZOS)) for f in frames])
    video = torch.from_numpy(frames.astype(np.float32) / 255.0).permute(0, 3, 1, 2) * 2 - 1
    return video[None].to(engine.denoiser.alpha_cumprod_sqrt.device)


def set_text_length(engine: VideoDiffusionEngine, length: int | None) -> None:
    """`text_length=`: the text encoders' token count (SAT samples CogVideoX 1.5 with 224, diffusers with 226)."""
    if length is None:
        return
    config = engine.network.config
    if not 1 <= length <= config.max_text_seq_length:
        raise BadInput(f"text_length={length} must be in 1..{config.max_text_seq_length} (the network's "
                       "max_text_seq_length)")
    if config.use_learned_positional_embeddings and length != config.max_text_seq_length:
        raise BadInput(f"text_length={length}: this model's learned positions (CogVideoX-5B-I2V) take exactly "
                       f"{config.max_text_seq_length} text tokens")
    for embedder in engine.conditioner.embedders:
        if hasattr(embedder, "max_length"):
            embedder.max_length = length
            getattr(embedder, "_cache", {}).clear()


def check_image_input(cfg: DictConfig, engine: VideoDiffusionEngine, units: list[Unit], shape) -> dict | None:
    """Every video's image (`image=`, or a .jsonl prompts file's "image") read at the video's size for an
    image-to-video model: {path: (1, 3, H, W)}. Refused (one line) for any other model, and missing or with a
    mode this model family cannot take yet for an image-to-video one."""
    if cfg.image_latent_scale is not None:
        engine.image_latent_scale = cfg.image_latent_scale
    given = [j.image for u in units for j in u.jobs]
    if not engine.image_to_video:
        if any(given):
            raise BadInput(f"image={next(i for i in given if i)}: this model is text-to-video; image= takes an "
                           "image-to-video model (CogVideoX-5B-I2V, CogVideoX1.5-5B-I2V)")
        return None
    if not all(given):
        raise BadInput("this model is image-to-video: give image=<png|jpg>, the video's first frame (or an "
                       "\"image\" for every line of a .jsonl prompts_file)")
    s, device = engine.first_stage_model.spatial_compression, engine.denoiser.alpha_cumprod_sqrt.device
    return {path: read_image(path, shape[2] * s, shape[3] * s).to(device) for path in dict.fromkeys(given)}


def seeded_generator(seed: int, device) -> torch.Generator:
    """The sampler's own generator for a video seeded by `seed` (its SDE noise)."""
    return torch.Generator(device=device).manual_seed(seed)


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
    and the temporary files of a write cut short (masks saved under control_options.save_masks_dir are left alone:
    the redone passes go beside them)."""
    files = [p for p in _planned(out, unit.jobs, cfg) if p.name != "samples.jsonl"]
    temporary = [t for p in files for t in p.parent.glob(f".{p.name}.*")]  # vdm.atomic's names
    return files + temporary + [out / "attn_map" / unit.name]


def isolated_videos(session: Session, job: Job, conds, ucs, randn: torch.Tensor,
                    first_segment: dict | None = None) -> list[VideoRecord]:
    """is_run_isolated (the reference's comparison): each prompt's own single-prompt video, sampled with
    plain attention from the noise of its first segment of the long latent, and all of them in a row; its
    conditions are that segment's (image-to-video: the first segment's `first_segment` entries hold the image)."""
    engine, multi = session.engine, session.multi
    plan, _ = multi.layout(len(job.prompts))
    starts = segment_starts(len(plan), multi.tile_size, multi.overlap_size)
    records, clips = [], []
    for i, prompt in enumerate(job.prompts):
        k = next(k for k, seg in enumerate(plan) if seg.a == seg.b == i)  # the prompt's first own segment
        noise = randn[:, starts[k]: starts[k] + multi.tile_size]
        cond, uc = conds[i], ucs[i]
        if k == 0 and first_segment:
            cond, uc = {**cond, **first_segment}, {**uc, **first_segment}
        latent = engine.decodable(engine.sample_single(cond, uc, noise, sampler=session.sampler,
                                                       generator=seeded_generator(job.seed, session.device)))
        video = engine.decode_video(latent)[0]
        clips.append(video)
        records.append(write(session, f"{job.name}_isolated_{i}", latent[0], video, job, [prompt], {},
                             session.sampler, role="isolated", control="base", segment=k))
    records.append(write(session, f"{job.name}_isolated_all", None, torch.cat(clips), job, list(job.prompts), {},
                         session.sampler, role="isolated_all", control="base"))
    return records


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
    videos = [out / f"{n}.mp4" for n in names + videos_only]
    return [out / "samples.jsonl", out / gallery.PAGE] + videos + web_copies(videos, cfg.video_format) + \
        ([out / f"{n}.safetensors" for n in names] if cfg.save_latents else [])


def read_low_res(path: str, engine: VideoDiffusionEngine, shape) -> torch.Tensor:
    """A low-resolution clip, 1/lr_scale of the model's size: (1, T, 3, h, w) in [-1, 1]."""
    if not engine.lr_scale:
        raise BadInput("lr_video needs a model trained with lr_scale; this checkpoint's lr_scale is null")
    frames = torch.from_numpy(read_mp4(path)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, h, w)
    s = engine.first_stage_model.spatial_compression
    size = (shape[2] * s, shape[3] * s)
    if (frames.shape[2] * engine.lr_scale, frames.shape[3] * engine.lr_scale) != size:
        raise BadInput(f"lr_video={path} is {frames.shape[2]}x{frames.shape[3]}; with lr_scale={engine.lr_scale} "
                       f"it must be {size[0] // engine.lr_scale}x{size[1] // engine.lr_scale}")
    return frames[None]


@torch.no_grad()
def sample_latents(engine: VideoDiffusionEngine, sampler, prompts: list[str], seeds: list[int],
                   shape: tuple[int, int, int, int], low_res: torch.Tensor | None = None,
                   control: AttentionControl | None = None, images: list[torch.Tensor] | None = None,
                   start: tuple[torch.Tensor, float] | None = None, cache: StepCache | None = None,
                   sequence: Processes | None = None) -> torch.Tensor:
    """Float32 latents `B T C H W` for one batch: prompt i from noise seeded by seeds[i], under `control`
    (plain when None). `low_res` (B T C H W pixels at 1/lr_scale of the size) conditions a super-resolution
    model, `images` (one (1, 3, H, W) per video) an image-to-video one; `start` (video, strength) makes it
    video-to-video; `sequence`: the processes its tokens are split over (ulysses)."""
    device = engine.denoiser.alpha_cumprod_sqrt.device
    if start is None:
        encoders = [image_encoder(engine, None if images is None else images[i]) for i in range(len(seeds))]
    else:  # video-to-video: each video's generator draws the input's posterior sample, then the noise
        encoders = [partial(engine.encode_video, start[0])] * len(seeds)
    starts = [seeded_start(shape, s, device, encode) for s, encode in zip(seeds, encoders)]
    randn = torch.stack([noise for noise, _ in starts])
    batch = {k: prompts for k in text_keys(engine)}
    if images is not None:  # image-to-video: the image latent over the video's frames, as `concat`
        batch[IMAGE_KEY] = torch.cat([image_layout(z, shape[0]) for _, z in starts]).to(device)
    grid = None
    if start is not None:  # the input's latent (x scale factor) noised to the first kept step: a·x0 + sqrt(1 − a²)·ε
        grid = sampler.grid().last(int(sampler.num_steps * start[1]))
        a = grid.alphas[0].item()
        z = engine.padded(torch.cat([z for _, z in starts]))  # 1.5, an odd count: a copy of the first in front
        randn = a * z + (1 - a * a) ** 0.5 * randn
    if low_res is not None:
        batch[LOW_RESOLUTION_KEY] = low_res.to(device)
    cond, uc = engine.conditioning(batch)
    # one generator per video: its SDE noise depends on its seed alone, not on the batch it landed in
    generators = [seeded_generator(s, device) for s in seeds]
    return engine.sample_single(cond, uc, randn, sampler=sampler, generator=generators, control=control, grid=grid,
                                cache=cache, sequence=sequence)


def text_keys(engine: VideoDiffusionEngine) -> list[str]:
    """The batch keys of the conditioner's text (the input keys of its embedders that are not `concat`)."""
    return [e.input_key for e in engine.conditioner.embedders if e.output_key != "concat"]
