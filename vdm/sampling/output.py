"""Writing a sampling job's files: mp4s, latents, samples.jsonl and the web copies of the mp4s, atomically and never
over existing files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from einops import rearrange
from safetensors.torch import save_file

from vdm.atomic import atomic_path
from vdm.data.video_io import probe, read_mp4, web_encoder, write_mp4, write_web_video
from vdm.errors import AlreadyExists, BadInput

WEB = "web"  # the folder of the videos' browser-playable copies, beside the lossless mp4s
VIDEO_FORMATS = ("both", "lossless")  # sample.py video_format=: lossless mp4s and their web copies, or the mp4s alone


def to_uint8(video: torch.Tensor):
    """(T, C, H, W) in [-1, 1] -> numpy (T, H, W, C) uint8."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(frames, "t c h w -> t h w c").cpu().numpy()


def check_free(paths: list[Path]) -> None:
    """Refuse the job before any work when one of its files exists (nothing is overwritten)."""
    clash = next((p for p in paths if p.exists()), None)
    if clash is not None:
        raise AlreadyExists(f"{clash} already exists; choose another output_dir (nothing is overwritten)")


def write_video(out: Path, name: str, video: torch.Tensor, fps: float, latent: torch.Tensor | None = None) -> dict:
    """`<name>.mp4` (and `<name>.safetensors` with the latent); returns the files for samples.jsonl."""
    write_mp4(out / f"{name}.mp4", to_uint8(video), fps=fps)
    record = {"file": f"{name}.mp4"}
    if latent is not None:
        save_latent(latent, out / f"{name}.safetensors")
        record["latent"] = f"{name}.safetensors"
    return record


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write atomically (temp file, then rename); refuses to replace an existing file."""
    check_free([path])
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def save_latent(latent: torch.Tensor, path: Path) -> None:
    check_free([path])
    with atomic_path(path) as tmp:
        save_file({"latent": latent.float().contiguous().cpu()}, tmp)


def check_video_format(video_format: str) -> None:
    if video_format not in VIDEO_FORMATS:
        raise BadInput(f"video_format={video_format!r}; valid: {', '.join(VIDEO_FORMATS)}")


def web_copy(out: Path, file: str) -> Path:
    """Where the web copy of the job's video `file` (`<name>.mp4`) goes: `web/<name>.mp4` (or `.webm`)."""
    return out / WEB / Path(file).with_suffix(web_encoder()[1]).name


def web_copies(videos: list[Path], video_format: str) -> list[Path]:
    """The web copies of a job's mp4s (none with video_format=lossless)."""
    check_video_format(video_format)
    return [web_copy(p.parent, p.name) for p in videos] if video_format == "both" else []


def write_web_copy(source: Path, target: Path) -> Path:
    """The browser-playable copy of the video `source` at its frame rate (H.264 4:2:0 or VP9; tiny clips enlarged)."""
    return write_web_video(target, read_mp4(source), probe(source).fps)
