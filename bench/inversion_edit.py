"""Editing real videos on the synthetic world: clips drawn by the world's renderer, inverted and edited.

    python bench/inversion_edit.py --checkpoint runs/<default run> --out /tmp/inversion-edit

Each clip (`SyntheticWorld(seed=--seed)`, items the default run never drew) is written as an mp4 and edited twice
through `sample.py`'s code path (`mode=edit video=<clip> prompts=[caption, target]`): to the next colour and to
the other shape, each setting one row of the table. Columns, from `vdm.eval.synthetic`'s judges on the written
files: `edits` the share of targets whose colour, shape and direction read as the target caption says; `strict`
the share of targets the strict judge passes whole; `paths` the share of targets whose foreground centroid stays
within 2 px of the input clip's in every frame; `recon` the mean PSNR of the reconstructions (source rows)
against the input (and its minimum); `s/edit` the wall time per edit (model loading included). The issue's
targets: >= 95% edits, >= 95% paths, reconstruction >= 30 dB. A contact sheet of input | reconstruction | edit
for the first setting's edits is written to <out>/sheet.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: overrides. The first is the default (conf/sample.yaml as it is: KV-sharing in steps [0, 20) of 50 and layers
# 1.. of the default run's 4); the others change one thing each.
SETTINGS = {
    "default": [],
    "iterations0": ["inversion.iterations=0"],
    "reference_window": ["control_options.start_step=2", "control_options.end_step=25", "control_options.start_layer=3"],
    "half_all_layers": ["control_options.end_step=25", "control_options.start_layer=0"],
    "base": ["control=[base]"],
}


def edits_of(caption: str) -> list[str]:
    """The clip's caption with the next colour, and with the other shape."""
    from vdm.data.synthetic import COLOURS

    words = caption.split()
    colours = list(COLOURS)
    recoloured = words[:1] + [colours[(colours.index(words[1]) + 1) % len(colours)]] + words[2:]
    reshaped = words[:2] + ["circle" if words[2] == "square" else "square"] + words[3:]
    return [" ".join(recoloured), " ".join(reshaped)]


def score(clip: np.ndarray, edited: np.ndarray, target: str) -> dict:
    from vdm.data.synthetic import parse_caption
    from vdm.eval.synthetic import classify_clip, judge_clip

    colour, shape, direction = parse_caption(target)
    read = classify_clip(edited)
    shown = (read["colour"], read["shape"], read["direction"]) == (colour, shape, direction)
    strict = judge_clip(edited, shape, direction=direction)["clip"]
    moved = np.abs(classify_clip(clip)["centroids"] - read["centroids"])
    kept = bool(np.all(np.isfinite(moved)) and moved.max() <= 2.0)
    return {"shown": shown, "strict": strict, "kept": kept}


def sheet(triples: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], path: Path, scale: int = 3) -> None:
    """Rows of input | reconstruction | edit (each clip's frames left to right), the target caption above."""
    from PIL import Image, ImageDraw

    T, H, W = triples[0][0].shape[:3]
    h, w, gap, label = H * scale, W * scale, 2, 12
    block = T * (w + gap) + 8
    image = Image.new("RGB", (3 * block, len(triples) * (h + label + gap)), (40, 40, 40))
    draw = ImageDraw.Draw(image)
    for r, (*videos, caption) in enumerate(triples):
        top = r * (h + label + gap)
        draw.text((2, top), f"input | reconstruction | {caption}", fill=(230, 230, 230))
        for b, video in enumerate(videos):
            for t, frame in enumerate(video):
                image.paste(Image.fromarray(np.kron(frame, np.ones((scale, scale, 1), np.uint8))),
                            (b * block + t * (w + gap), top + label))
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    from vdm.build import compose
    from vdm.data.synthetic import SyntheticWorld
    from vdm.data.video_io import read_mp4, write_mp4
    from vdm.sampling import sample

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a run or checkpoint folder (default: the newest run)")
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--out", required=True, type=Path, help="a new folder for the clips, edits and sheet")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1234, help="the world's seed for the clips (the run trains on 0)")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS),
                        help=f"rows: {', '.join(SETTINGS)}, or NAME:KEY=VALUE,KEY=VALUE (overrides of that row)")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every edit (key=value)")
    args = parser.parse_args(argv)
    settings = {}
    for setting in args.settings:
        name, _, given = setting.partition(":")
        if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            parser.error(f"setting name {name!r}: letters, digits, '_', '-' and '.' only (it names a folder)")
        settings[name] = given.split(",") if given else SETTINGS.get(name, [])
    logging.basicConfig(level=logging.WARNING)
    if args.out.exists():
        print(f"error: --out {args.out} exists; give a new folder", file=sys.stderr)
        return 2
    world = SyntheticWorld(seed=args.seed)
    clips = []
    for i in range(args.clips):
        frames, caption = world.render(i)
        path = args.out / "clips" / f"clip_{i:03d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(path, frames, fps=8)
        clips.append((path, frames, caption))
    source = [f"checkpoint={args.checkpoint}"] if args.checkpoint else [f"runs_root={args.runs_root}"]
    print(f"{'setting':<12} {'edits':>6} {'strict':>7} {'paths':>6} {'recon dB':>9} {'min dB':>7} {'s/edit':>7}")
    results = {}
    for name, overrides in settings.items():
        rows, psnrs, triples, start = [], [], [], time.perf_counter()
        for i, (path, frames, caption) in enumerate(clips):
            for k, target in enumerate(edits_of(caption)):
                out = sample(compose([*source, "mode=edit", f"video={path}", f"prompts=[{caption},{target}]",
                                      f"output_dir={args.out / name / f'clip_{i:03d}_{k}'}", "sampler.verbose=false",
                                      *overrides, *args.set], config_name="sample"))
                recon, edit = (json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines())
                edited, reconstructed = read_mp4(out / edit["file"]), read_mp4(out / recon["file"])
                rows.append(score(frames, edited, target))
                psnrs.append(recon["inputs"]["reconstruction_psnr"])
                triples.append((frames, reconstructed, edited, target))
        seconds = (time.perf_counter() - start) / len(rows)
        share = {key: 100 * float(np.mean([r[key] for r in rows])) for key in ("shown", "strict", "kept")}
        results[name] = {**share, "recon_psnr": float(np.mean(psnrs)), "min_psnr": float(np.min(psnrs)),
                         "seconds": seconds, "edits": len(rows)}
        print(f"{name:<12} {share['shown']:>5.1f}% {share['strict']:>6.1f}% {share['kept']:>5.1f}% "
              f"{np.mean(psnrs):>9.2f} {np.min(psnrs):>7.2f} {seconds:>7.2f}", flush=True)
        if name == next(iter(settings)):
            sheet(triples[:16], args.out / "sheet.png")
    (args.out / "table.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
