"""Score generated videos of the synthetic world: does each show the colour, shape and motion it was asked for?

`classify_clip` reads a clip without seeing its prompt. Diffusion samples are noisy (speckled
background, soft edges, off colours), so every step is chosen to tolerate that:

- foreground: brightness = max over RGB (every world colour has a 255 channel); the clip's
  threshold sits halfway between the background (median brightness) and the object (99th
  percentile) -- at half height a symmetric blur leaves a straight edge where it was.
- location: per frame, the shape_size box that best matches the foreground, scored with the
  square template plus the disc template; that box's mask is the object, and speckles outside it
  are ignored. A frame whose box is less than a quarter lit counts as empty.
- colour: the mean colour of all object pixels, scaled so its largest channel is 255, nearest to
  the four references (so a dim yellow is still yellow).
- shape: the square and disc templates differ only in the 20 corner pixels of the box; a frame
  votes "square" when more than half of them are lit, and the majority of frames decides.
- direction: least-squares velocity of the object centroid over all frames; the dominant axis and
  its sign (image y grows downwards). `max_step` is the largest frame-to-frame centroid move, for
  spotting jumps.

`judge_clip` is the strict judge beside it: every frame's shape against the prompt's template, stray
foreground pixels, a clean background and the centroid path (see its docstring).

CLI: `python -m vdm.eval.synthetic <samples.jsonl or its folder>` prints both tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm

from vdm.data.synthetic import COLOURS, DIRECTIONS, SHAPES, parse_caption, shape_mask
from vdm.data.video_io import read_mp4
from vdm.errors import BadInput, NotFound, UserError

log = logging.getLogger(__name__)


def classify_clip(frames: np.ndarray, shape_size: int = 10, min_contrast: float = 32.0) -> dict:
    """Classify one clip, uint8 (T, H, W, 3), of the synthetic world.

    Returns a dict with `colour`, `shape`, `direction` (None when the clip shows no object, or
    fewer than two frames do for the direction), `centroids` float (T, 2) as (x, y) with NaN for
    empty frames, `max_step` (px, NaN without two consecutive non-empty frames), `velocity`
    (vx, vy) px/frame and `foreground_frames` (how many frames show the object).
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        desc = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise BadInput(f"frames must be a uint8 array (T, H, W, 3), got {desc}")
    T, H, W, _ = frames.shape
    s = shape_size
    if H < s or W < s:
        raise BadInput(f"frames of {H}x{W} are smaller than shape_size {s}")

    brightness = frames.max(axis=-1).astype(np.float32)  # (T, H, W)
    background, level = np.median(brightness), np.percentile(brightness, 99)
    threshold = max((background + level) / 2, background + min_contrast)
    mask = brightness > threshold  # (T, H, W)

    square, disc = shape_mask("square", s), shape_mask("circle", s)
    corners = square & ~disc
    # Score every box position by square + disc template correlation: one unique best offset for either shape.
    windows = sliding_window_view(mask, (s, s), axis=(1, 2))  # (T, H-s+1, W-s+1, s, s)
    score = np.einsum("tyxij,ij->tyx", windows, square.astype(np.float32) + disc)
    best = score.reshape(T, -1).argmax(axis=1)
    ys, xs = np.unravel_index(best, score.shape[1:])
    boxes = windows[np.arange(T), ys, xs]  # (T, s, s) object mask in its box
    lit = boxes.sum(axis=(1, 2))
    present = lit >= 0.25 * disc.sum()

    centroids = np.full((T, 2), np.nan)
    grid = np.arange(s) + 0.5  # pixel centres inside the box
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids[:, 0] = xs + (boxes.sum(axis=1) * grid).sum(axis=1) / lit
        centroids[:, 1] = ys + (boxes.sum(axis=2) * grid).sum(axis=1) / lit
    centroids[~present] = np.nan

    result = {"colour": None, "shape": None, "direction": None, "centroids": centroids,
              "max_step": float("nan"), "velocity": (float("nan"), float("nan")),
              "foreground_frames": int(present.sum())}
    if not present.any():
        return result

    # Colour: mean over every object pixel of every non-empty frame, normalised to a peak of 255.
    ts = np.flatnonzero(present)
    rows = ys[ts, None] + np.arange(s)  # (n, s)
    cols = xs[ts, None] + np.arange(s)
    pixels = frames[ts[:, None, None], rows[:, :, None], cols[:, None, :]]  # (n, s, s, 3)
    mean = pixels[boxes[ts]].astype(np.float64).mean(axis=0)
    mean = mean * 255.0 / max(mean.max(), 1e-6)
    names = list(COLOURS)
    references = np.array([COLOURS[n] for n in names], dtype=np.float64)
    result["colour"] = names[int(np.linalg.norm(references - mean, axis=1).argmin())]

    # Shape: per-frame vote on the corner pixels, majority wins; a tie goes to the mean corner fill.
    corner_fill = boxes[ts][:, corners].mean(axis=1)
    votes = (corner_fill > 0.5).mean()
    is_square = votes > 0.5 if votes != 0.5 else corner_fill.mean() > 0.5
    result["shape"] = "square" if is_square else "circle"

    if len(ts) >= 2:
        c = centroids[ts]
        t_centered = ts - ts.mean()
        velocity = (t_centered[:, None] * (c - c.mean(axis=0))).sum(axis=0) / (t_centered**2).sum()
        result["velocity"] = (float(velocity[0]), float(velocity[1]))
        axis = int(np.abs(velocity).argmax())
        step = [0, 0]
        step[axis] = int(np.sign(velocity[axis])) or 1
        result["direction"] = next(d for d, v in DIRECTIONS.items() if list(v) == step)
        consecutive = present[1:] & present[:-1]
        if consecutive.any():
            steps = np.linalg.norm(np.diff(centroids, axis=0), axis=1)[consecutive]
            result["max_step"] = float(steps.max())
    return result


STRICT_METRICS = ("frame_shape", "frame_exact", "frame_clean", "frame_present", "path", "clip")
HALF_PIXEL_OFFSETS = (-0.5, 0.0, 0.5)


def shape_templates(shape: str, shape_size: int = 10, offsets: tuple[float, ...] = HALF_PIXEL_OFFSETS) -> np.ndarray:
    """The prompted shape drawn at sub-pixel centres: bool (len(offsets)**2, s + 2, s + 2), one window per
    (dy, dx), a one-pixel margin around the world's s-pixel box; offset (0, 0) is `shape_mask` framed by that
    margin. A pixel is lit when its centre lies in the shape: the disc's closed circle of radius s/2, the
    square's half-open [c - s/2, c + s/2), so a square at any offset is s x s pixels."""
    if shape not in SHAPES:
        raise BadInput(f"shape {shape!r} is not one of {list(SHAPES)}")
    s = shape_size
    centres = np.arange(s + 2) + 0.5  # pixel centres of the window; the world's box spans [1, s + 1)
    out = []
    for dy in offsets:
        for dx in offsets:
            y = centres[:, None] - (1 + s / 2 + dy)
            x = centres[None, :] - (1 + s / 2 + dx)
            if shape == "circle":
                out.append(x**2 + y**2 <= (s / 2) ** 2)
            else:
                out.append((x >= -s / 2) & (x < s / 2) & (y >= -s / 2) & (y < s / 2))
    return np.stack(out)


def judge_clip(frames: np.ndarray, shape: str, shape_size: int = 10, speed: int = 2, object_level: float = 128.0,
               stray_level: float = 64.0, min_iou: float = 0.9, max_path_error: float = 1.0,
               direction: str | None = None) -> dict:
    """The strict judge: every frame of a uint8 (T, H, W, 3) clip against the world's rules, for the
    prompted `shape`. Per frame:
    - present: the best `shape_size` box holds at least half a shape of pixels brighter than `object_level`;
    - shape: the bright pixels of that box, grown by one pixel, overlap the prompted shape drawn at the box
      centre moved by -0.5, 0 or +0.5 px on each axis with IoU >= `min_iou`, and better than the other shape
      does at any of those offsets (a notched square, a lumpy circle or a square drawn for a circle fails).
      The half-pixel offsets matter for discs only: a 10 px disc centred on a pixel centre instead of a
      pixel corner is 11 px across, and a generated circle sitting half a pixel off the world's grid,
      thresholded, is exactly that; it is round, and its position is the path check's business;
    - exact (reported, not part of `clip`): the same IoU test against the world's own pixel grid only
      (offset 0, the s-pixel box), which fails those half-pixel discs;
    - clean: no pixel outside the box (grown by one pixel) is brighter than `stray_level` (no stray blob,
      no appendage, no grey background);
    and over the clip: the centroids lie on a straight line (max residual <= `max_path_error` px) and
    move `speed` px per frame (within 1 px), so jumps and flicker fail; given the prompt's `direction`, the
    line also drifts at most `max_path_error` px across that direction over the whole clip (a shape asked to
    move up that slides sideways fails). Returns per-frame flags and
    `clip`, true when everything holds in every frame.
    """
    if shape not in SHAPES:
        raise BadInput(f"shape {shape!r} is not one of {list(SHAPES)}")
    T, H, W, _ = frames.shape
    s = shape_size
    brightness = frames.max(axis=-1).astype(np.float32)  # (T, H, W)
    bright = brightness > object_level
    templates = {name: shape_mask(name, s) for name in ("square", "circle")}
    other = "circle" if shape == "square" else "square"
    windows = sliding_window_view(bright, (s, s), axis=(1, 2))  # (T, H-s+1, W-s+1, s, s)
    score = np.einsum("tyxij,ij->tyx", windows, templates["square"].astype(np.float32) + templates["circle"])
    ys, xs = np.unravel_index(score.reshape(T, -1).argmax(axis=1), score.shape[1:])
    boxes = windows[np.arange(T), ys, xs]  # (T, s, s)

    def iou(masks: np.ndarray, template: np.ndarray) -> np.ndarray:
        """(T, h, w) masks against (k, h, w) templates -> (T, k)."""
        inter = np.einsum("thw,khw->tk", masks.astype(np.float32), template.astype(np.float32))
        union = masks.sum(axis=(1, 2))[:, None] + template.sum(axis=(1, 2))[None, :] - inter
        return inter / np.maximum(union, 1)

    present = boxes.sum(axis=(1, 2)) >= 0.5 * templates["circle"].sum()
    on_grid = iou(boxes, templates[shape][None])[:, 0]
    exact = (on_grid >= min_iou) & (on_grid > iou(boxes, templates[other][None])[:, 0]) & present
    padded = np.pad(bright, ((0, 0), (1, 1), (1, 1)))  # the grown box of a box at the frame edge
    grown = np.stack([padded[t, ys[t]: ys[t] + s + 2, xs[t]: xs[t] + s + 2] for t in range(T)])  # (T, s+2, s+2)
    best = iou(grown, shape_templates(shape, s)).max(axis=1)
    shape_ok = (best >= min_iou) & (best > iou(grown, shape_templates(other, s)).max(axis=1)) & present
    outside = np.ones((T, H, W), dtype=bool)
    for t in range(T):
        outside[t, max(ys[t] - 1, 0): ys[t] + s + 1, max(xs[t] - 1, 0): xs[t] + s + 1] = False
    stray = ((brightness > stray_level) & outside).sum(axis=(1, 2))
    clean = stray == 0

    path_ok = bool(present.all())
    if path_ok and T >= 2:
        grid = np.arange(s) + 0.5
        lit = boxes.sum(axis=(1, 2))
        centroids = np.stack([xs + (boxes.sum(axis=1) * grid).sum(axis=1) / lit,
                              ys + (boxes.sum(axis=2) * grid).sum(axis=1) / lit], axis=1)  # (T, 2)
        t = np.arange(T) - (T - 1) / 2
        slope = (t[:, None] * (centroids - centroids.mean(axis=0))).sum(axis=0) / (t**2).sum()
        residual = np.abs(centroids - centroids.mean(axis=0) - t[:, None] * slope).max()
        steps = np.linalg.norm(np.diff(centroids, axis=0), axis=1)
        path_ok = bool(residual <= max_path_error and np.all(np.abs(steps - speed) <= 1.0))
        if direction is not None:
            across = 1 if DIRECTIONS[direction][0] != 0 else 0  # the image axis the motion should not use
            path_ok = path_ok and bool(abs(slope[across]) * (T - 1) <= max_path_error)
    return {"frame_shape": shape_ok, "frame_exact": exact, "frame_clean": clean, "frame_present": present,
            "stray_pixels": stray, "path": path_ok, "clip": bool(shape_ok.all() and clean.all() and path_ok)}


def _read_samples(samples_jsonl: Path) -> list[dict]:
    if not samples_jsonl.is_file():
        raise NotFound(f"samples file {samples_jsonl} does not exist")
    samples = []
    for number, line in enumerate(samples_jsonl.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{samples_jsonl}:{number} is not valid JSON: {e}") from e
        if not isinstance(sample, dict) or not isinstance(sample.get("file"), str):
            raise BadInput(f"{samples_jsonl}:{number} needs a string key 'file' (the mp4 path)")
        prompts = sample.get("prompts")
        if not isinstance(prompts, list) or not prompts or not isinstance(prompts[0], str):
            raise BadInput(f"{samples_jsonl}:{number} needs a key 'prompts' holding a non-empty list of strings")
        samples.append(sample)
    if not samples:
        raise BadInput(f"samples file {samples_jsonl} holds no samples")
    return samples


def evaluate(samples_jsonl: Path, shape_size: int = 10, progress: bool = False) -> dict:
    """Classify every video listed in `samples_jsonl` and compare it with its caption, `prompts[0]`.

    Each line is a JSON object with `file` (mp4 path, absolute or relative to the jsonl's folder)
    and `prompts` (multi-prompt videos are scored against their first prompt). Returns
    `{"count": n, "accuracy": {"colour", "shape", "direction", "all"}, "rows": [...]}`, one row per
    sample with the caption, the predictions, per-attribute correctness and `max_step`.
    """
    samples_jsonl = Path(samples_jsonl)
    samples = _read_samples(samples_jsonl)
    rows = []
    for sample in tqdm(samples, desc="classifying", disable=not progress):
        path = Path(sample["file"])
        if not path.is_absolute():
            path = samples_jsonl.parent / path
        caption = sample["prompts"][0]
        target = dict(zip(("colour", "shape", "direction"), parse_caption(caption)))
        frames = read_mp4(path)
        found = classify_clip(frames, shape_size=shape_size)
        row = {"file": str(path), "caption": caption}
        for key, value in target.items():
            row[f"pred_{key}"] = found[key]
            row[f"{key}_ok"] = found[key] == value
        row["all_ok"] = all(row[f"{key}_ok"] for key in target)
        row["max_step"] = found["max_step"]
        row["foreground_frames"] = found["foreground_frames"]
        row["strict"] = judge_clip(frames, target["shape"], shape_size=shape_size, direction=target["direction"])
        rows.append(row)
    accuracy = {key: float(np.mean([r[f"{key}_ok"] for r in rows])) for key in ("colour", "shape", "direction", "all")}
    strict = {key: float(np.mean(np.concatenate([np.atleast_1d(r["strict"][key]) for r in rows])))
              for key in STRICT_METRICS}
    log.info("evaluated %d samples from %s: %s; strict %s", len(rows), samples_jsonl, accuracy, strict)
    return {"count": len(rows), "accuracy": accuracy, "strict": strict, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdm.eval.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="samples.jsonl, or the folder holding it")
    parser.add_argument("--shape-size", type=int, default=10, help="side of the world's shapes in px")
    args = parser.parse_args(argv)
    path = args.path / "samples.jsonl" if args.path.is_dir() else args.path
    try:
        result = evaluate(path, shape_size=args.shape_size, progress=sys.stderr.isatty())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = result["count"]
    steps = np.array([r["max_step"] for r in result["rows"]], dtype=np.float64)
    print(f"{n} samples from {path}")
    print(f"{'attribute':<10} {'accuracy':>9} {'correct':>9}")
    for key, acc in result["accuracy"].items():
        print(f"{key:<10} {100 * acc:>8.1f}% {round(acc * n):>5d}/{n}")
    if np.isfinite(steps).any():
        print(f"max_step px: median {np.nanmedian(steps):.2f}, max {np.nanmax(steps):.2f}")
    labels = {"frame_shape": "frames whose shape is the prompt's (IoU >= 0.9)",
              "frame_exact": "  ... on the world's pixel grid (no half-pixel shift)",
              "frame_clean": "frames without stray pixels or grey background",
              "frame_present": "frames showing the object",
              "path": "clips moving straight along the prompt's axis at 2 px/frame",
              "clip": "clips passing every strict check"}
    print("strict judge (per frame):")
    for key, label in labels.items():
        print(f"  {label:<60} {100 * result['strict'][key]:>6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
