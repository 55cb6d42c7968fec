"""VideoFolder: captioned mp4 clips from a folder, decoded with PyAV into fixed-size training clips.

Two layouts are read:
  cogvideox  `prompts.txt` and `videos.txt` in `root`: line i of each holds a caption and the path of
             its video (relative to `root`), as CogVideoX's fine-tuning scripts expect. Blank lines
             are dropped from both files, as those scripts do.
  jsonl      one JSON object per line with the caption under `caption_key` and the video path under
             `video_key`: `root/metadata.jsonl`, or `root` itself when it is a `.jsonl` file (paths
             relative to the file's folder).
`layout="auto"` picks cogvideox when `prompts.txt` or `videos.txt` exists, else jsonl.

Item i holds `num_frames` frames sampled at `fps` from the start of its clip: frame j is the source
frame on screen at time t0 + j/fps (t0: the first frame's time), so a 24 fps clip read at 8 fps gives
source frames 0, 3, 6, ... and a clip slower than `fps` repeats frames. Each frame is resized keeping
its aspect ratio until it covers height x width (bilinear, antialiased), then centre-cropped.

Every listed video is probed once at construction (container and stream metadata, no decoding); a
missing, unopenable or too short video is left out and counted, and the folder is refused when more
than `max_unreadable_fraction` of its videos are unreadable.
"""

from __future__ import annotations

import json
import logging
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vdm.errors import BadInput, NotFound

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "cogvideox", "jsonl")
PROMPTS_FILE = "prompts.txt"
VIDEOS_FILE = "videos.txt"
METADATA_FILE = "metadata.jsonl"


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_cogvideox_layout(folder: Path) -> list[tuple[str, Path]]:
    """(caption, video path) pairs from `folder/prompts.txt` and `folder/videos.txt`."""
    prompts, videos = folder / PROMPTS_FILE, folder / VIDEOS_FILE
    missing = [p.name for p in (prompts, videos) if not p.is_file()]
    if missing:
        raise NotFound(f"{folder}: the cogvideox layout needs both {PROMPTS_FILE} and {VIDEOS_FILE}; "
                       f"missing: {', '.join(missing)}")
    captions, paths = _read_lines(prompts), _read_lines(videos)
    if len(captions) != len(paths):
        raise BadInput(f"{prompts} has {len(captions)} non-blank lines but {videos} has {len(paths)}; "
                       "line i of each must be the caption and the video of clip i")
    return [(caption, folder / path) for caption, path in zip(captions, paths)]


def read_jsonl_layout(path: Path, caption_key: str, video_key: str) -> list[tuple[str, Path]]:
    """(caption, video path) pairs from a jsonl file, video paths relative to its folder."""
    if not path.is_file():
        raise NotFound(f"jsonl metadata file {path} does not exist")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{number} is not valid JSON ({e.msg}); each line must be one JSON object") from e
        if not isinstance(row, dict):
            raise BadInput(f"{path}:{number} holds a {type(row).__name__}; each line must be one JSON object")
        for key in (caption_key, video_key):
            if key not in row:
                raise BadInput(f"{path}:{number} has no key {key!r} (keys: {sorted(row)}); "
                               "set caption_key / video_key to the names this file uses")
        entries.append((str(row[caption_key]), path.parent / str(row[video_key])))
    return entries


def find_entries(root: Path, layout: str, caption_key: str, video_key: str) -> tuple[list[tuple[str, Path]], str]:
    """(entries, layout used) for `root`, a folder or a `.jsonl` file."""
    if layout not in LAYOUTS:
        raise BadInput(f"VideoFolder layout={layout!r}; valid: {', '.join(LAYOUTS)}")
    if root.is_file():
        if root.suffix != ".jsonl" or layout == "cogvideox":
            raise BadInput(f"VideoFolder root={str(root)!r} is a file; a file root must be a .jsonl file "
                           f"(layout auto or jsonl), a cogvideox root a folder with {PROMPTS_FILE} + {VIDEOS_FILE}")
        return read_jsonl_layout(root, caption_key, video_key), "jsonl"
    if not root.is_dir():
        raise NotFound(f"VideoFolder root={str(root)!r} does not exist; expected a folder or a .jsonl file")
    if layout == "auto":
        if (root / PROMPTS_FILE).exists() or (root / VIDEOS_FILE).exists():
            layout = "cogvideox"
        elif (root / METADATA_FILE).is_file():
            layout = "jsonl"
        else:
            raise NotFound(f"{root} holds neither {PROMPTS_FILE} + {VIDEOS_FILE} (layout cogvideox) nor "
                           f"{METADATA_FILE} (layout jsonl); a .jsonl file of another name can be given as root")
    if layout == "cogvideox":
        return read_cogvideox_layout(root), layout
    return read_jsonl_layout(root / METADATA_FILE, caption_key, video_key), layout


def _av_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e).splitlines()[0]


def probe(path: Path, num_frames: int, fps: Fraction) -> str | None:
    """Why `path` cannot give `num_frames` frames at `fps` (None when it can), from metadata alone."""
    if not path.is_file():
        return "missing"
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "no video stream"
            stream = container.streams.video[0]
            if not stream.codec_context.width or not stream.codec_context.height:
                return "no frame size"
            rate = stream.average_rate or stream.guessed_rate
            if stream.frames and rate:
                duration = Fraction(stream.frames) / Fraction(rate)
            elif stream.duration and stream.time_base:
                duration = stream.duration * Fraction(stream.time_base)
            elif container.duration:
                duration = Fraction(container.duration, av.time_base)
            else:
                return "unknown duration"
    except (av.FFmpegError, OSError) as e:
        return f"not readable: {_av_reason(e)}"
    needed = Fraction(num_frames - 1) / fps
    if needed >= duration:
        return (f"too short: {float(duration):.3g} s, {num_frames} frames at {float(fps):g} fps need more than "
                f"{float(needed):.3g} s")
    return None


def sample_frames(path: Path, num_frames: int, fps: Fraction) -> np.ndarray:
    """uint8 (num_frames, H, W, 3): the source frames on screen at t0 + j/fps, decoding no further than needed."""
    chosen: list[np.ndarray] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        time_base = Fraction(stream.time_base)
        rate = Fraction(stream.average_rate or stream.guessed_rate or 0)
        t0 = None
        prev, prev_time, prev_array = None, None, None
        for index, frame in enumerate(container.decode(stream)):
            time = Fraction(frame.pts) * time_base if frame.pts is not None else Fraction(index) / rate
            if t0 is None:
                t0 = time
            # every target time before this frame shows the previous one
            while len(chosen) < num_frames and t0 + Fraction(len(chosen)) / fps < time:
                if prev_array is None:
                    prev_array = prev.to_ndarray(format="rgb24")
                chosen.append(prev_array)
            if len(chosen) == num_frames:
                break
            prev, prev_time, prev_array = frame, time, None
        if prev is None:
            raise BadInput(f"video file {path} holds no decodable frames")
        # past the last frame: it stays on screen for one frame period
        end = prev_time + (1 / rate if rate else 0)
        while len(chosen) < num_frames:
            if t0 + Fraction(len(chosen)) / fps >= end:
                raise BadInput(f"video file {path} ends at {float(end - t0):.3g} s, too short for {num_frames} "
                               f"frames at {float(fps):g} fps (its metadata promised more)")
            if prev_array is None:
                prev_array = prev.to_ndarray(format="rgb24")
            chosen.append(prev_array)
    return np.stack(chosen)


def resize_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(T, C, h, w) -> (T, C, height, width): scale keeping aspect until it covers, then centre-crop."""
    h, w = video.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        video = F.interpolate(video, size=size, mode="bilinear", align_corners=False, antialias=True)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        video = video[..., top:top + height, left:left + width]
    return video


class VideoFolder(Dataset):
    """Captioned videos from a folder (see the module docstring for layouts and sampling).

    `__getitem__` returns `{input_key: float32 (T, 3, H, W) in [-1, 1], text_key: caption}`.
    `unreadable` lists the (path, reason) of every video left out.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        num_frames: int = 49,
        height: int = 480,
        width: int = 720,
        fps: float = 8.0,
        layout: str = "auto",
        caption_key: str = "caption",
        video_key: str = "video",
        max_unreadable_fraction: float = 0.5,
        input_key: str = "mp4",
        text_key: str = "txt",
    ):
        if num_frames < 1 or (num_frames - 1) % 4:
            raise BadInput(f"VideoFolder num_frames={num_frames} must be 4k+1 (the causal VAE's frame counts): "
                           "1, 5, 9, 13, ..., 49")
        for name, value in (("height", height), ("width", width), ("fps", fps)):
            if value <= 0:
                raise BadInput(f"VideoFolder {name}={value} must be > 0")
        if not 0.0 <= max_unreadable_fraction <= 1.0:
            raise BadInput(f"VideoFolder max_unreadable_fraction={max_unreadable_fraction} must be in [0, 1]")
        self.root = Path(root)
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.input_key, self.text_key = input_key, text_key

        listed, self.layout = find_entries(self.root, layout, caption_key, video_key)
        if not listed:
            raise BadInput(f"{self.root}: no video listed (layout {self.layout})")
        self.entries: list[tuple[str, Path]] = []
        self.unreadable: list[tuple[Path, str]] = []
        for caption, path in tqdm(listed, desc=f"probe {self.root.name}", disable=None, leave=False):
            reason = probe(path, self.num_frames, self.fps)
            if reason is None:
                self.entries.append((caption, path))
            else:
                self.unreadable.append((path, reason))
        self._check_unreadable(len(listed), max_unreadable_fraction)
        log.info("%s: %d videos (%s layout), %d frames of %dx%d at %g fps", self.root, len(self.entries),
                 self.layout, self.num_frames, self.height, self.width, float(self.fps))

    def _check_unreadable(self, listed: int, max_fraction: float) -> None:
        if not self.unreadable:
            return
        first_path, first_reason = self.unreadable[0]
        if not self.entries:
            raise BadInput(f"{self.root}: no readable video ({listed} listed, e.g. {first_path}: {first_reason})")
        n = len(self.unreadable)
        if n / listed > max_fraction:
            raise BadInput(f"{self.root}: {n} of {listed} videos unreadable, more than max_unreadable_fraction="
                           f"{max_fraction}; first: {first_path} ({first_reason})")
        log.warning("%d of %d videos unreadable: first: %s (%s)", n, listed, first_path, first_reason)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        caption, path = self.entries[index]
        frames = torch.from_numpy(sample_frames(path, self.num_frames, self.fps))
        video = rearrange(frames, "t h w c -> t c h w").float()
        video = resize_crop(video, self.height, self.width) / 127.5 - 1.0
        return {self.input_key: video.clamp_(-1.0, 1.0), self.text_key: caption}
