"""Sample videos from a trained run: `python sample.py prompts='["a red square moving right"]'`."""

import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from vdm.data.video_io import read_mp4, write_mp4
from vdm.sampling import (
    find_checkpoint,
    latent_shape,
    load_engine,
    make_sampler,
    sample_latents,
    save_latent,
    to_uint8,
    write_jsonl,
)

log = logging.getLogger("vdm.sample")


def read_prompts(cfg: DictConfig) -> list[str]:
    usage = "e.g. prompts='[\"a red square moving right\"]' or prompts_file=prompts.txt"
    if (cfg.prompts is None) == (cfg.prompts_file is None):
        raise ValueError(f"give exactly one of prompts or prompts_file ({usage})")
    if cfg.prompts_file is not None:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file={path}: no such file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts_file={path} holds no prompt (one per line)")
        return prompts
    prompts = [cfg.prompts] if isinstance(cfg.prompts, str) else cfg.prompts
    if not isinstance(prompts, (list, ListConfig)) or not prompts or not all(
            isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty strings ({usage})")
    if len(prompts) > 1:
        raise ValueError("several prompts in `prompts` would make one multi-prompt video, which is not supported "
                         "yet; use prompts_file for one video per prompt")
    return [p.strip() for p in prompts]


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
    up = torch.nn.functional.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    return up[None]


def run(cfg: DictConfig) -> Path:
    prompts = read_prompts(cfg)
    if cfg.num_samples < 1 or cfg.batch_size < 1 or cfg.steps < 1:
        raise ValueError("num_samples, batch_size and steps must be >= 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    checkpoint = find_checkpoint(cfg.checkpoint, cfg.runs_root)
    out = Path(cfg.output_dir) if cfg.output_dir else \
        checkpoint.parent.parent / "samples" / time.strftime("%Y-%m-%d_%H-%M-%S")
    jobs = [(prompt, k) for prompt in prompts for k in range(cfg.num_samples)]
    names = [f"sample_{i:04d}" for i in range(len(jobs))]
    planned = [out / "samples.jsonl"] + [out / f"{n}.mp4" for n in names]
    planned += [out / f"{n}.safetensors" for n in names] if cfg.save_latents else []
    clash = next((p for p in planned if p.exists()), None)
    if clash is not None:
        raise FileExistsError(f"{clash} already exists; choose another output_dir (nothing is overwritten)")

    loaded = load_engine(checkpoint, cfg.use_ema, device)
    engine = loaded.engine
    sampler = make_sampler(loaded.config, cfg.sampler, cfg.steps, cfg.cfg, cfg.get("guider"))
    shape = latent_shape(engine, cfg.num_frames, cfg.height, cfg.width)
    low_res = read_low_res(cfg.lr_video, engine, shape) if cfg.lr_video else None
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for start in range(0, len(jobs), cfg.batch_size):
        batch = jobs[start: start + cfg.batch_size]
        seeds = [cfg.seed + start + j for j in range(len(batch))]
        lr = None if low_res is None else low_res.expand(len(batch), -1, -1, -1, -1)
        latents = sample_latents(engine, sampler, [p for p, _ in batch], seeds, shape, lr)
        videos = engine.decode_video(latents)
        for j, ((prompt, _), seed) in enumerate(zip(batch, seeds)):
            name = names[start + j]
            write_mp4(out / f"{name}.mp4", to_uint8(videos[j]), fps=cfg.fps)
            row = {"file": f"{name}.mp4", "prompts": [prompt], "seed": seed, "sampler": type(sampler).__name__,
                   "steps": cfg.steps, "cfg": cfg.cfg, "checkpoint": str(checkpoint)}
            if cfg.save_latents:
                save_latent(latents[j], out / f"{name}.safetensors")
                row["latent"] = f"{name}.safetensors"
            rows.append(row)
        log.info("%d / %d videos", len(rows), len(jobs))
    write_jsonl(rows, out / "samples.jsonl")
    log.info("wrote %d videos and samples.jsonl to %s", len(rows), out)
    return out


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        out = run(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(out)


if __name__ == "__main__":
    main()
