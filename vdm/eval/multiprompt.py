"""Multi-prompt videos of the synthetic world: do they follow their prompts, hold together, move smoothly?

For every multi-prompt video in a `samples.jsonl` (rows with two or more prompts), grouped by the
attention control it was made with (`control`; `adaln` in older files):
- first / last: the first and last `clip` frames classify as the first / last prompt (all of colour,
  shape, direction);
- holds: colour and shape stay the first prompt's in every `clip`-frame window (stride 3);
- smooth: the largest frame-to-frame centroid step is at most `max_jump` px.

    python -m vdm.eval.multiprompt <samples.jsonl or its folder> [more ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from vdm.data.synthetic import parse_caption
from vdm.data.video_io import read_mp4
from vdm.errors import BadInput, UserError
from vdm.eval.synthetic import _read_samples, classify_clip

METRICS = ("first", "last", "holds", "smooth")


def cases() -> list[str]:
    """The test bed: for every colour and shape, a two-prompt video (right, then down) and a
    three-prompt one (right, down, left), as `prompts_file` lines."""
    from vdm.data.synthetic import COLOURS, SHAPES

    lines = []
    for colour in COLOURS:
        for shape in SHAPES:
            lines.append(f"a {colour} {shape} moving right | a {colour} {shape} moving down")
            lines.append(f"a {colour} {shape} moving right | a {colour} {shape} moving down | "
                         f"a {colour} {shape} moving left")
    return lines


def _follows(found: dict, caption: str) -> bool:
    colour, shape, direction = parse_caption(caption)
    return (found["colour"], found["shape"], found["direction"]) == (colour, shape, direction)


def score_video(frames: np.ndarray, prompts: list[str], clip: int = 9, max_jump: float = 4.0) -> dict:
    if len(frames) < clip:
        raise BadInput(f"a multi-prompt video needs at least {clip} frames, got {len(frames)}")
    colour, shape, _ = parse_caption(prompts[0])
    windows = [classify_clip(frames[s:s + clip]) for s in range(0, len(frames) - clip + 1, 3)]
    whole = classify_clip(frames)
    return {
        "first": _follows(classify_clip(frames[:clip]), prompts[0]),
        "last": _follows(classify_clip(frames[-clip:]), prompts[-1]),
        "holds": all(w["colour"] == colour and w["shape"] == shape for w in windows),
        "smooth": bool(np.isfinite(whole["max_step"]) and whole["max_step"] <= max_jump),
        "max_step": whole["max_step"],
    }


def evaluate_multiprompt(samples_jsonl: Path, clip: int = 9, max_jump: float = 4.0) -> dict:
    """{control: {"count": n, metric: rate, ...}} over the multi-prompt rows of `samples_jsonl`."""
    samples_jsonl = Path(samples_jsonl)
    by_control: dict[str, list[dict]] = defaultdict(list)
    for sample in _read_samples(samples_jsonl):
        if len(sample["prompts"]) < 2:
            continue
        path = Path(sample["file"])
        path = path if path.is_absolute() else samples_jsonl.parent / path
        by_control[sample.get("control", sample.get("adaln", "base"))].append(score_video(read_mp4(path), sample["prompts"], clip, max_jump))
    if not by_control:
        raise BadInput(f"{samples_jsonl} lists no multi-prompt video (rows with two or more prompts)")
    return {control: {"count": len(scores), **{m: float(np.mean([s[m] for s in scores])) for m in METRICS}}
            for control, scores in by_control.items()}


def layout_label(samples_jsonl: Path) -> str:
    """The layout the videos were made with, from samples.jsonl (tile / overlap / transition blocks)."""
    keys = ("tile_size", "overlap_size", "num_transition_blocks", "longer_mid_segment")  # not segments: per video
    layouts = {json.dumps({k: row["layout"][k] for k in keys}) for row in _read_samples(samples_jsonl)
               if row.get("layout")}
    if len(layouts) != 1:
        return "mixed layouts" if layouts else "layout not recorded"
    layout = json.loads(layouts.pop())
    return (f"tile {layout['tile_size']}, overlap {layout['overlap_size']}, "
            f"{layout['num_transition_blocks']} transition blocks")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdm.eval.multiprompt", description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", help="samples.jsonl files, or the folders holding them")
    parser.add_argument("--max-jump", type=float, default=4.0)
    args = parser.parse_args(argv)
    for given in args.paths:
        path = given / "samples.jsonl" if given.is_dir() else given
        try:
            result = evaluate_multiprompt(path, max_jump=args.max_jump)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        controls = list(result)
        print(f"multi-prompt videos from {path} ({layout_label(path)})")
        print(f"{'':<28}" + "".join(f"{c:>24}" for c in controls))
        print(f"{'videos':<28}" + "".join(f"{result[c]['count']:>24d}" for c in controls))
        labels = {"first": "first 9 frames follow P1", "last": "last 9 frames follow PK",
                  "holds": "colour+shape hold", "smooth": f"no jump (step <= {args.max_jump:g} px)"}
        for metric in METRICS:
            print(f"{labels[metric]:<28}" + "".join(f"{100 * result[c][metric]:>23.1f}%" for c in controls))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
