"""Sample videos from a trained run.

    python sample.py prompts='["a red square moving right"]'                       # one video
    python sample.py prompts='["a red square moving right", "a red square moving down"]' adaln=[base,kv_sharing]
    python sample.py prompts_file=prompts.txt                                        # a video per line (" | " joins prompts)
    python sample.py mode=edit prompts='["a red square moving right", "a blue square moving right"]'
    python sample.py mode=reweight prompts='["a red square moving right"]' reweight_token_idx=2 reweight_scale=3
"""

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from vdm.data.video_io import read_mp4, write_mp4
from vdm.diffusion.multi_prompt import check_tiles
from vdm.networks.controls import CONTROLS
from vdm.sampling import (
    find_checkpoint,
    latent_shape,
    load_engine,
    make_multi_prompt_sampler,
    make_sampler,
    sample_latents,
    save_latent,
    text_keys,
    to_uint8,
    write_jsonl,
)

log = logging.getLogger("vdm.sample")
USAGE = "e.g. prompts='[\"a red square moving right\"]' or prompts_file=prompts.txt"
MODES = ("sample", "edit", "reweight")
LAYOUT = ("tile_size", "overlap_size", "num_transition_blocks", "longer_mid_segment")


def _check_prompt_list(prompts, where: str) -> list[str]:
    if not isinstance(prompts, (list, ListConfig)) or not prompts or not all(
            isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{where} must be a non-empty list of non-empty strings ({USAGE})")
    return [p.strip() for p in prompts]


def read_prompts(cfg: DictConfig) -> list[list[str]]:
    """The videos to make, each a list of prompts (several: one multi-prompt video)."""
    if (cfg.prompts is None) == (cfg.prompts_file is None):
        raise ValueError(f"give exactly one of prompts or prompts_file ({USAGE})")
    if cfg.prompts is not None:
        return [_check_prompt_list([cfg.prompts] if isinstance(cfg.prompts, str) else cfg.prompts, "prompts")]
    path = Path(cfg.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompts_file={path}: no such file")
    if path.suffix in (".yaml", ".yml"):  # the reference's case-file form: one multi-prompt video
        data = OmegaConf.load(path)
        if not isinstance(data, DictConfig) or "prompts" not in data:
            raise ValueError(f"prompts_file={path} must hold a `prompts:` list")
        return [_check_prompt_list(data.prompts, f"{path}: prompts")]
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompts_file={path} holds no prompt (one video per line; ' | ' separates prompts)")
    return [_check_prompt_list([p for p in line.split(" | ")], f"{path}: line {line!r}") for line in lines]


def read_low_res(path: str, engine, shape) -> torch.Tensor:
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


@dataclass
class Job:
    prompts: list[str]
    control: str  # attention control name ("base" for single-prompt videos)
    seed: int
    name: str


def control_options(cfg: DictConfig, name: str) -> dict:
    options = OmegaConf.to_container(cfg.control, resolve=True) if name != "base" else {}
    if name in ("reweight", "ReWeightAdaLNMixin"):
        if cfg.reweight_token_idx is None:
            raise ValueError("the reweight control needs reweight_token_idx=<text token index> (and reweight_scale)")
        options.update(reweight_token_idx=cfg.reweight_token_idx, reweight_scale=cfg.reweight_scale)
    return options


def plan_jobs(cfg: DictConfig, videos: list[list[str]]) -> list[Job]:
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r}; valid: {', '.join(MODES)}")
    adaln = [cfg.adaln] if isinstance(cfg.adaln, str) else list(cfg.adaln)
    unknown = [a for a in adaln if a not in CONTROLS]
    if not adaln or unknown:
        raise ValueError(f"adaln={adaln}: valid controls are {', '.join(CONTROLS)}")
    if cfg.mode == "edit" and any(len(v) != 2 for v in videos):
        raise ValueError("mode=edit takes exactly two prompts per video: prompts='[source, target]'")
    if cfg.mode == "reweight":
        videos = [v * 2 if len(v) == 1 else v for v in videos]
        if any(len(v) != 2 for v in videos):
            raise ValueError("mode=reweight takes one prompt (or [source, target]) per video")
        adaln = ["reweight"]
    layout_given = [k for k in ("num_transition_blocks", "longer_mid_segment") if cfg[k]]
    if cfg.mode == "sample" and layout_given and any(len(v) == 1 for v in videos):
        raise ValueError(f"{layout_given[0]}={cfg[layout_given[0]]} needs at least two prompts per video; "
                         "a single-prompt video takes no transition options")
    jobs = []
    for v, prompts in enumerate(videos):
        controls = adaln if (len(prompts) > 1 or cfg.mode != "sample") else ["base"]
        for control in controls:  # the same seeds for every control: a side-by-side comparison
            for k in range(cfg.num_samples):
                jobs.append(Job(prompts, control, cfg.seed + v * cfg.num_samples + k, f"sample_{len(jobs):04d}"))
    return jobs


def run(cfg: DictConfig) -> Path:
    videos = read_prompts(cfg)
    if cfg.num_samples < 1 or cfg.batch_size < 1 or cfg.steps < 1:
        raise ValueError("num_samples, batch_size and steps must be >= 1")
    jobs = plan_jobs(cfg, videos)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    checkpoint = find_checkpoint(cfg.checkpoint, cfg.runs_root)
    out = Path(cfg.output_dir) if cfg.output_dir else \
        checkpoint.parent.parent / "samples" / time.strftime("%Y-%m-%d_%H-%M-%S")
    suffixes = ["", "_target"] if cfg.mode != "sample" else [""]
    planned = [out / "samples.jsonl"] + [out / f"{j.name}{s}.mp4" for j in jobs for s in suffixes]
    planned += [out / f"{j.name}{s}.safetensors" for j in jobs for s in suffixes] if cfg.save_latents else []
    clash = next((p for p in planned if p.exists()), None)
    if clash is not None:
        raise FileExistsError(f"{clash} already exists; choose another output_dir (nothing is overwritten)")

    loaded = load_engine(checkpoint, cfg.use_ema, device)
    engine = loaded.engine
    engine.set_offload(cfg.offload)
    sampler = make_sampler(loaded.config, cfg.sampler, cfg.steps, cfg.cfg, cfg.get("guider"))
    shape = latent_shape(engine, cfg.num_frames, cfg.height, cfg.width)
    low_res = read_low_res(cfg.lr_video, engine, shape) if cfg.lr_video else None
    multi = None
    if any(len(j.prompts) > 1 for j in jobs) and cfg.mode == "sample":
        multi = make_multi_prompt_sampler(loaded.config, cfg.steps, cfg.cfg, cfg.get("guider"),
                                          **{k: cfg[k] for k in LAYOUT})
        multi.tile_size = multi.tile_size or shape[0]  # default: segments as long as the network's clips
        check_tiles(multi.tile_size, multi.overlap_size, engine.network.config.max_latent_frames)
    text_length = engine.conditioning({k: ["x"] for k in text_keys(engine)})[0]["crossattn"].shape[1]
    for control in {j.control for j in jobs}:  # every control's options, windows and tokens, before any work
        engine.switch_adaln_layer(control, **control_options(cfg, control))
        engine.network.control.validate(engine.network.config.num_layers, cfg.steps)
        _check_tokens(control_options(cfg, control), text_length)
    out.mkdir(parents=True, exist_ok=True)

    def row(job: Job, file: str, prompts: list[str], extra: dict | None = None) -> dict:
        return {"file": file, "prompts": prompts, "seed": job.seed, "sampler": type(multi if len(prompts) > 1 and
                multi else sampler).__name__, "steps": cfg.steps, "cfg": cfg.cfg, "adaln": job.control,
                "mode": cfg.mode, "checkpoint": str(checkpoint), **(extra or {})}

    def write(name: str, latent: torch.Tensor, video: torch.Tensor, record: dict) -> dict:
        write_mp4(out / f"{name}.mp4", to_uint8(video), fps=cfg.fps)
        if cfg.save_latents:
            save_latent(latent, out / f"{name}.safetensors")
            record["latent"] = f"{name}.safetensors"
        return record

    rows = []
    single = [j for j in jobs if len(j.prompts) == 1 and cfg.mode == "sample"]
    for start in range(0, len(single), cfg.batch_size):  # single-prompt videos, batched
        batch = single[start: start + cfg.batch_size]
        lr = None if low_res is None else low_res.expand(len(batch), -1, -1, -1, -1)
        latents = sample_latents(engine, sampler, [j.prompts[0] for j in batch], [j.seed for j in batch], shape, lr)
        videos_out = engine.decode_video(latents)
        for j, job in enumerate(batch):
            rows.append(write(job.name, latents[j], videos_out[j], row(job, f"{job.name}.mp4", job.prompts)))
        log.info("%d / %d videos", len(rows), len(jobs))
    for job in (j for j in jobs if j not in single):
        engine.switch_adaln_layer(job.control, **control_options(cfg, job.control))
        generator = torch.Generator(device=device).manual_seed(job.seed)
        if cfg.mode == "sample":  # one long multi-prompt video
            conds, ucs = zip(*(engine.conditioning({k: [p] for k in text_keys(engine)}) for p in job.prompts))
            frames = multi.layout(len(job.prompts))[1]
            randn = torch.randn((1, frames, *shape[1:]), generator=torch.Generator().manual_seed(job.seed)).to(device)
            latent = engine.sample_multi_prompt(list(conds), list(ucs), randn, sampler=multi, generator=generator)
            rows.append(write(job.name, latent[0], engine.decode_video(latent)[0],
                              row(job, f"{job.name}.mp4", job.prompts, {"frames": int(latent.shape[1])})))
        else:  # edit / reweight: [source, target] from the same noise
            cond, uc = engine.conditioning({k: job.prompts for k in text_keys(engine)})
            randn = torch.randn((1, *shape), generator=torch.Generator().manual_seed(job.seed)).to(device)
            latents = engine.sample_pair(cond, uc, randn, sampler=sampler, generator=generator)
            decoded = engine.decode_video(latents)
            for i, suffix in enumerate(suffixes):
                name = f"{job.name}{suffix}"
                rows.append(write(name, latents[i], decoded[i], row(job, f"{name}.mp4", [job.prompts[i]],
                                                                    {"role": ("source", "target")[i]})))
        log.info("%d / %d videos", len(rows), len(jobs) * len(suffixes))
    rows.sort(key=lambda r: r["file"])  # job order (single-prompt videos were sampled first, batched)
    write_jsonl(rows, out / "samples.jsonl")
    log.info("wrote %d videos and samples.jsonl to %s", len(rows), out)
    return out


def _check_tokens(options: dict, length: int) -> None:
    """A control's token options against the text length, before anything is sampled."""
    for key in ("ref_token_idx", "cur_token_idx", "reweight_token_idx"):
        values = options.get(key)
        values = [values] if isinstance(values, int) else (values or [])
        bad = [v for v in values if not 0 <= int(v) < length]
        if bad:
            raise ValueError(f"{key}={bad[0]} is beyond the text length {length} (valid 0..{length - 1})")


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        out = run(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(out)


if __name__ == "__main__":
    main()
