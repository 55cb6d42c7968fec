"""Reading and writing short RGB clips as .mp4 files (PyAV).

Encoding: H.264 in its lossless RGB form (libx264rgb, qp 0, pix_fmt rgb24: High 4:4:4 Predictive
with the RGB matrix), so a write/read round trip is exact -- colours survive on tiny 32x32 frames.
FFmpeg-based readers (PyAV, ffmpeg, torchvision, decord) decode it; browsers do not. Without
libx264rgb, libx264 qp 0 in yuv444p is used (lossless in YUV: the RGB <-> YUV rounding costs at
most 2 levels per channel), then PNG frames in the mp4 container (exact). None of these subsample
chroma, so odd widths and heights are written as they are, without padding.

Writes are atomic: the clip is encoded to a hidden temporary file in the target's folder and moved
onto the target with `os.replace` only once complete; a failed write leaves nothing behind.

`write_web_video` makes the copy a browser plays (the gallery's): H.264 4:2:0 in mp4, or VP9 in WebM without
libx264, which every current browser decodes. 4:2:0 needs even sides, so tiny clips are enlarged by whole
pixels (nearest neighbour: a 32x32 clip becomes 128x128) and an odd side gets its last row or column again.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np

from vdm.atomic import atomic_path
from vdm.errors import AlreadyExists, BadInput, NotFound

log = logging.getLogger(__name__)

# (codec, pix_fmt, options), best first.
ENCODERS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("libx264rgb", "rgb24", {"qp": "0"}),
    ("libx264", "yuv444p", {"qp": "0"}),
    ("png", "rgb24", {}),
)
# Encoders whose round trip is bit-exact on RGB frames.
EXACT_ENCODERS = ("libx264rgb", "png")


def choose_encoder() -> tuple[str, str, dict[str, str]]:
    """The first of `ENCODERS` that the installed PyAV/FFmpeg offers."""
    for codec, pix_fmt, options in ENCODERS:
        if codec in av.codecs_available:
            return codec, pix_fmt, options
    raise RuntimeError(f"PyAV offers none of the encoders {[e[0] for e in ENCODERS]}; install an FFmpeg build with libx264")


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float = 8, overwrite: bool = False) -> Path:
    """Write uint8 frames (T, H, W, 3) to `path` (.mp4) atomically; returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise BadInput(f"path {str(path)!r} must end in .mp4")
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        desc = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise BadInput(f"frames must be a uint8 array (T, H, W, 3), got {desc}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise BadInput(f"frames must hold at least one non-empty frame, got shape {frames.shape}")
    if fps <= 0:
        raise BadInput(f"fps must be > 0, got {fps}")
    if path.exists() and not overwrite:
        raise AlreadyExists(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)

    codec, pix_fmt, options = choose_encoder()
    with atomic_path(path, suffix=".tmp.mp4") as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = dict(options)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush
    log.debug("wrote %s (%d frames, %s/%s)", path, len(frames), codec, pix_fmt)
    return path


# (codec, suffix, pix_fmt, options) of the web copy, best first: each plays in every current browser.
WEB_ENCODERS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("libx264", ".mp4", "yuv420p", {"crf": "18", "preset": "medium"}),
    ("libvpx-vp9", ".webm", "yuv420p", {"crf": "24", "b": "0"}),
)
WEB_MIN_SIDE = 128  # a web copy's longer side is enlarged (by a whole factor) to at least this many pixels


def web_encoder() -> tuple[str, str, str, dict[str, str]]:
    """The first of `WEB_ENCODERS` that the installed PyAV/FFmpeg offers."""
    for encoder in WEB_ENCODERS:
        if encoder[0] in av.codecs_available:
            return encoder
    raise RuntimeError(f"PyAV offers none of the web encoders {[e[0] for e in WEB_ENCODERS]}; install an FFmpeg "
                       "build with libx264 or libvpx, or sample with video_format=lossless")


def web_scale(height: int, width: int) -> int:
    """The whole factor a web copy enlarges a clip by: its longer side to at least `WEB_MIN_SIDE`."""
    return max(1, -(-WEB_MIN_SIDE // max(height, width)))


def web_size(height: int, width: int) -> tuple[int, int]:
    """The (height, width) of a clip's web copy: enlarged by `web_scale`, then rounded up to even sides."""
    k = web_scale(height, width)
    return height * k + height * k % 2, width * k + width * k % 2


def write_web_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> Path:
    """Write uint8 frames (T, H, W, 3) as a browser-playable clip at `path` (its suffix: `web_encoder()`'s),
    atomically and never over an existing file; returns the path."""
    path = Path(path)
    codec, suffix, pix_fmt, options = web_encoder()
    if path.suffix.lower() != suffix:
        raise BadInput(f"path {str(path)!r} must end in {suffix} (the web encoder {codec}'s container)")
    if path.exists():
        raise AlreadyExists(f"{path} already exists; nothing is overwritten")
    (height, width), k = web_size(*frames.shape[1:3]), web_scale(*frames.shape[1:3])
    frames = frames.repeat(k, axis=1).repeat(k, axis=2)
    frames = np.pad(frames, ((0, 0), (0, height - frames.shape[1]), (0, width - frames.shape[2]), (0, 0)), mode="edge")
    with atomic_path(path, suffix=f".tmp{suffix}") as tmp, av.open(str(tmp), mode="w", format=suffix[1:]) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt, stream.options = width, height, pix_fmt, dict(options)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush
    return path


class VideoInfo(NamedTuple):
    frames: int
    height: int
    width: int
    fps: float


def probe(path: str | os.PathLike) -> VideoInfo:
    """The first video stream of `path` as its header describes it."""
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadInput(f"video file {path} holds no video stream")
            stream = container.streams.video[0]
            frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            return VideoInfo(frames, stream.height, stream.width, float(stream.average_rate or stream.guessed_rate))
    except av.FFmpegError as e:
        raise BadInput(f"video file {path} is not a readable video: {e}") from e


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of the first video stream of `path` as uint8 (T, H, W, 3) RGB."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"video file {path} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadInput(f"video file {path} holds no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.FFmpegError as e:
        raise BadInput(f"video file {path} is not a readable video: {e}") from e
    if not frames:
        raise BadInput(f"video file {path} holds no decodable frames")
    return np.stack(frames)
