"""Data: the built-in synthetic world and mp4 reading/writing."""

from vdm.data.synthetic import (
    CAPTIONS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SyntheticWorld,
    parse_caption,
    render_clip,
)
from vdm.data.video_io import read_mp4, write_mp4

__all__ = [
    "COLOURS",
    "SHAPES",
    "DIRECTIONS",
    "CAPTIONS",
    "parse_caption",
    "render_clip",
    "SyntheticWorld",
    "read_mp4",
    "write_mp4",
]
