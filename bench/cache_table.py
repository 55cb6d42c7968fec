"""Step caches on the synthetic world: every cache at a few settings beside no cache, in one table from one run.

    python bench/cache_table.py --checkpoint runs/<default run> --out /tmp/cache-table

For a trained run (default: the newest under runs/), every row samples the world's 32 captions (`--per-caption`
videos each, seeds 42 + i) through `sample.py`'s code path with the run's own sampler and steps; the first row has
no cache, the others one cache setting each. TeaCache has no published coefficients for a vdm run, so they are
fitted first from uncached sampling of a few captions (`vdm.sampling.teacache_fit`). The uncached row runs
`cache=first_block cache.threshold=0`, which computes every step (bit for bit the uncached video) and counts
its blocks. Columns: block evaluations per
video (PAB: attention evaluations per video too), seconds per video (wall time over the row's videos, model
loading included once per row), the PSNR of each video's frames against the uncached video of the same seed
(mean over videos), and `vdm.eval.synthetic`'s lenient accuracy and strict per-frame figures. The issue's target:
a setting with >= 1.5x fewer block evaluations and >= 1.4x less wall time that loses <= 2 points on every strict
figure.
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

SETTINGS = ["none", "first_block:0.05", "first_block:0.1", "first_block:0.2", "pab:2", "pab:3",
            "teacache:0.1", "teacache:0.2", "teacache:0.3"]


def overrides_of(setting: str, coefficients: list[float] | None) -> list[str]:
    name, _, value = setting.partition(":")
    if name == "none":  # a first-block cache at 0 computes every step, bit for bit the uncached video, and counts
        return ["cache=first_block", "cache.threshold=0"]
    if name == "pab":
        return ["cache=pab", f"cache.block_skip_range={int(value)}"]
    extra = [f"cache.coefficients=[{','.join(repr(c) for c in coefficients)}]"] if name == "teacache" else []
    return [f"cache={name}", f"cache.threshold={value}", *extra]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def main(argv: list[str] | None = None) -> int:
    from vdm.build import compose
    from vdm.data.synthetic import CAPTIONS
    from vdm.data.video_io import read_mp4
    from vdm.eval.synthetic import evaluate
    from vdm.sampling import sample
    from vdm.sampling.teacache_fit import fit, record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a run or checkpoint folder (default: the newest run)")
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the rows' samples")
    parser.add_argument("--settings", nargs="+", default=SETTINGS, help="none, first_block:<t>, pab:<n>, teacache:<t>")
    parser.add_argument("--per-caption", type=int, default=2)
    parser.add_argument("--captions", type=int, default=len(CAPTIONS), help="the first N of the world's captions")
    parser.add_argument("--steps", type=int, default=None, help="default: the run's sampler steps")
    parser.add_argument("--fit-captions", type=int, default=4, help="captions whose uncached sampling fits TeaCache")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"--out {args.out} exists; give a new folder")
    if args.settings[0] != "none":
        args.settings = ["none", *args.settings]  # the reference every row is compared with
    captions = list(CAPTIONS[:args.captions])
    args.out.mkdir(parents=True)
    prompts = args.out / "captions.txt"
    prompts.write_text("\n".join(captions) + "\n")
    source = [f"checkpoint={args.checkpoint}"] if args.checkpoint else []
    base = [*source, f"runs_root={args.runs_root}", f"prompts_file={prompts}", f"num_samples={args.per_caption}",
            "sampler.verbose=false", *([f"steps={args.steps}"] if args.steps else [])]

    coefficients = None
    if any(s.startswith("teacache") for s in args.settings):
        fit_cfg = compose([*source, f"runs_root={args.runs_root}", f"prompts={json.dumps(captions[:args.fit_captions])}",
                           *([f"steps={args.steps}"] if args.steps else [])], config_name="sample")
        coefficients = fit(record(fit_cfg, captions[:args.fit_captions]))
        print(f"TeaCache coefficients fitted on {args.fit_captions} captions: {coefficients}")

    table = []
    for setting in args.settings:
        out = args.out / setting.replace(":", "_")
        start = time.perf_counter()
        sample(compose([*base, f"output_dir={out}", *overrides_of(setting, coefficients)], config_name="sample"))
        seconds = time.perf_counter() - start
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        scored = evaluate(out / "samples.jsonl")
        reference = args.out / "none"
        psnrs = [psnr(read_mp4(out / r["file"]), read_mp4(reference / r["file"])) for r in rows]
        cache = [r.get("cache") for r in rows]
        blocks = np.mean([c["block_evaluations"] for c in cache]) if cache[0] else None
        attention = np.mean([c["attention_evaluations"] for c in cache]) if cache[0] and "attention_evaluations" in \
            cache[0] else None
        table.append({"setting": setting, "blocks": blocks, "attention": attention, "s_per_video": seconds / len(rows),
                      "psnr": float(np.mean([p for p in psnrs if np.isfinite(p)] or [float("inf")])),
                      "accuracy": scored["accuracy"]["all"], "strict": scored["strict"]})
    uncached = table[0]
    print(f"{len(captions)} captions x {args.per_caption}; rows: block evaluations / video (uncached: steps x layers), "
          "s/video, PSNR vs uncached (dB), lenient all-attributes accuracy, strict per-frame figures (%)")
    keys = list(uncached["strict"])
    print(f"{'setting':<18} {'blocks':>8} {'attn':>7} {'s/video':>8} {'speed':>6} {'PSNR':>6} {'all':>6} "
          + " ".join(f"{k:>13}" for k in keys))
    for row in table:
        blocks = row["blocks"]
        speed = uncached["s_per_video"] / row["s_per_video"]
        print(f"{row['setting']:<18} {blocks if blocks is not None else '-':>8} "
              f"{row['attention'] if row['attention'] is not None else '-':>7} {row['s_per_video']:>8.2f} "
              f"{speed:>5.2f}x {row['psnr']:>6.1f} {100 * row['accuracy']:>5.1f}% "
              + " ".join(f"{100 * row['strict'][k]:>12.1f}%" for k in keys))
    (args.out / "table.json").write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
