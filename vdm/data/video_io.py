"""Reading and writing short RGB clips as .mp4 files (PyAV).

Encoding: H.264 in its lossless RGB form (libx264rgb, qp 0, pix_fmt rgb24: High 4:4:4 Predictive
with the RGB matrix), so a write/read round trip is exact -- colours survive on tiny 32x32 frames.
FFmpeg-based readers (PyAV, ffmpeg, torchvision, decord) decode it; browsers do not. Without
libx264rgb, libx264 qp 0 in yuv444p is used (lossless in YUV: the RGB <-> YUV rounding costs at
most 2 levels per channel), then PNG frames in the mp4 container (exact). None of these subsample
chroma, so odd widths and heights are written as they are, without padding.

Writes are atomic: the clip is encoded to a hidden temporary file in the target's folder and moved
onto the target with `os.replace` only once complete; a failed write leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path

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
