"""A contact sheet of sampled videos: one row per video (its frames left to right), the prompt above it.

    python -m vdm.eval.contact_sheet <samples folder or samples.jsonl> sheet.png [--max-videos 16] [--scale 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vdm.atomic import atomic_path
from vdm.data.video_io import read_mp4
from vdm.errors import AlreadyExists, UserError
from vdm.eval.synthetic import _read_samples

LABEL_HEIGHT, GAP = 12, 2


def contact_sheet(samples_jsonl: Path, max_videos: int = 16, scale: int = 3, max_frames: int = 24) -> Image.Image:
    rows = _read_samples(samples_jsonl)[:max_videos]
    videos = [read_mp4(samples_jsonl.parent / row["file"])[:max_frames] for row in rows]
    T = max(len(v) for v in videos)
    H, W = videos[0].shape[1] * scale, videos[0].shape[2] * scale
    sheet = Image.new("RGB", (T * (W + GAP), len(videos) * (H + LABEL_HEIGHT + GAP)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i, (row, video) in enumerate(zip(rows, videos)):
        top = i * (H + LABEL_HEIGHT + GAP)
        draw.text((2, top), f"{row['file']}: {' | '.join(row['prompts'])} [{row.get('control', row.get('adaln', ''))}]",
                  fill=(230, 230, 230))
        for t, frame in enumerate(video):
            big = np.kron(frame, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else frame
            sheet.paste(Image.fromarray(big[: H, : W]), (t * (W + GAP), top + LABEL_HEIGHT))
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdm.eval.contact_sheet", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="samples.jsonl, or the folder holding it")
    parser.add_argument("out", type=Path, help="the PNG to write (never overwritten)")
    parser.add_argument("--max-videos", type=int, default=16)
    parser.add_argument("--max-frames", type=int, default=24)
    parser.add_argument("--scale", type=int, default=3)
    args = parser.parse_args(argv)
    path = args.path / "samples.jsonl" if args.path.is_dir() else args.path
    try:
        if args.out.exists():
            raise AlreadyExists(f"{args.out} already exists; choose another file")
        sheet = contact_sheet(path, args.max_videos, args.scale, args.max_frames)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    with atomic_path(args.out) as tmp:
        sheet.save(tmp, format="PNG")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
