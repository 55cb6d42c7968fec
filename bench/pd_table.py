"""Progressive distillation on the synthetic world: distil a trained run into 8-, 4-, 2- and 1-step students and
score them beside their teacher at the same steps, in one table.

    python bench/pd_table.py --teacher runs/default --out /tmp/pd-table   # distil, sample, score, print

One distillation run (`train.py use_pd=true`, teacher_steps -> ... -> `--student-steps`, `--steps-per-round`
each) gives a student per round (its final checkpoint); the table shows those at 8 steps and fewer. Then every
row samples the 32 captions twice through `sample.py`'s code path (seeds 42 + i), and `vdm.eval.synthetic`
scores them: the lenient colour / shape / direction accuracy and the strict per-frame figures (frames whose
shape is the prompt's, frames free of stray pixels). Rows: the teacher with its default sampler (DPM++(2M)
SDE) and CFG at 50 steps and at each student's steps, the teacher with DDIM (the students' sampler) at each
student's steps, and the students with DDIM at their steps, one conditional pass per step (guidance is
distilled). Last, for each student step count, the student's strict figures against the better teacher row
at those steps. Seconds per video are wall time over the batch of 64 (model loading and mp4 writing
included), so they depend on the machine's load.

The CFG scale (`--cfg`) is both the teacher rows' scale and the one distilled into the students: 1.5, the
synthetic world's scale when guided (conf/guider/cfg.yaml; the world samples unguided by default, so the
distillation run sets guider=cfg).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vdm import runs  # noqa: E402
from vdm.build import compose  # noqa: E402
from vdm.data.synthetic import CAPTIONS  # noqa: E402
from vdm.eval.synthetic import evaluate  # noqa: E402
from vdm.sampling import sample  # noqa: E402
from vdm.training.loop import train  # noqa: E402

MODEL_KEYS = ("network", "discretization", "denoiser", "first_stage", "conditioner")


def distil(teacher: Path, out: Path, args) -> Path:
    """The distillation run folder (reused when it already finished)."""
    overrides = [f"runs_root={out}", "run_name=pd", "use_pd=true", f"init_from={teacher}",
                 f"pd.teacher_steps={args.teacher_steps}", f"pd.student_steps={args.student_steps}",
                 f"pd.steps_per_round={args.steps_per_round}", f"pd.lr={args.lr}",
                 "guider=cfg", f"guider.scale={args.cfg}",
                 f"batch_size={args.batch_size}", "video_every=0", "checkpoint.every=null", "log_every=50",
                 "sampler.verbose=false", "resume=auto"]
    cfg = compose(overrides, config_name="train")
    recorded = runs.read_run_config(teacher)
    for key in MODEL_KEYS:  # the teacher's weights must fit this run's model
        if recorded[key] != cfg[key]:
            raise SystemExit(f"error: the teacher run's {key} differs from the default config's; "
                             "distil it with its own groups")
    run_dir = out / "pd"
    start = time.perf_counter()
    train(cfg, run_dir)
    logging.info("distillation: %.0f s", time.perf_counter() - start)
    return run_dir


def sample_and_score(checkpoint: Path, folder: Path, captions: Path, overrides: list[str], explicit: set[str]) -> dict:
    if not (folder / "samples.jsonl").is_file():
        cfg = compose([f"checkpoint={checkpoint}", f"prompts_file={captions}", "num_samples=2",
                       f"output_dir={folder}", "sampler.verbose=false", *overrides], config_name="sample")
        start = time.perf_counter()
        sample(cfg, frozenset(explicit))
        (folder / "seconds.txt").write_text(f"{time.perf_counter() - start:.3f}\n")
    result = evaluate(folder / "samples.jsonl")
    return {**result["accuracy"], **result["strict"], "seconds": float((folder / "seconds.txt").read_text()) /
            result["count"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=ROOT / "runs" / "default", help="the teacher run folder")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "vdm-pd-table",
                        help="work folder, outside runs_root (else the students become the latest run)")
    parser.add_argument("--teacher-steps", type=int, default=32, help="the first teacher's DDIM steps")
    parser.add_argument("--student-steps", type=int, default=1, help="the last round's student's DDIM steps")
    parser.add_argument("--steps-per-round", type=int, default=450)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cfg", type=float, default=1.5, help="the teacher's CFG scale, distilled into the students")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    captions = out / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")

    start = time.perf_counter()
    run_dir = distil(args.teacher, out, args)
    distil_minutes = (time.perf_counter() - start) / 60
    students = {runs.read_distillation(c)["student_steps"]: c for c in runs.list_checkpoints(run_dir)
                if runs.read_distillation(c)["round_complete"]}
    teacher = runs.latest_checkpoint(args.teacher)
    guided = f"cfg={args.cfg}"
    few = sorted((n for n in students if n <= 8), reverse=True)
    rows = [(f"teacher, DPM++ CFG {args.cfg}", n, 2 * n, teacher, ["sampler=dpmpp", f"steps={n}", guided],
             f"teacher-dpmpp-{n}") for n in (50, *few)]
    rows += [(f"teacher, DDIM CFG {args.cfg}", n, 2 * n, teacher, ["sampler=ddim", f"steps={n}", guided],
              f"teacher-ddim-{n}") for n in few]
    rows += [("student, DDIM, distilled CFG", n, n, students[n], [], f"student-{n}") for n in few]

    header = (f"{'model':<30} {'steps':>5} {'passes':>6} {'colour':>7} {'shape':>7} {'direction':>9} "
              f"{'shape frames':>12} {'stray-free':>10} {'s/video':>8}")
    lines, scores = [header, "-" * len(header)], {}
    for name, steps, passes, checkpoint, overrides, folder in rows:
        explicit = {o.split("=")[0] for o in overrides}
        r = scores[folder] = sample_and_score(checkpoint, out / folder, captions, overrides, explicit)
        lines.append(f"{name:<30} {steps:>5} {passes:>6} {100 * r['colour']:>6.1f}% {100 * r['shape']:>6.1f}% "
                     f"{100 * r['direction']:>8.1f}% {100 * r['frame_shape']:>11.1f}% {100 * r['frame_clean']:>9.1f}% "
                     f"{r['seconds']:>8.3f}")
    print(f"teacher {teacher}; students {', '.join(f'{n}: {students[n]}' for n in few)}")
    print(f"distillation {args.teacher_steps} -> {args.student_steps} DDIM steps, {args.steps_per_round} steps per "
          f"round at lr {args.lr}, batch {args.batch_size}: {distil_minutes:.1f} min; all: "
          f"{(time.perf_counter() - start) / 60:.1f} min")
    print("passes: network evaluations per video (CFG: 2 per step); 32 captions x 2 seeds per row; shape frames and "
          "stray-free are the strict judge's per-frame figures")
    print("\n".join(lines))
    print("\nstudent against the better teacher row at its steps (strict figures, percentage points):")
    for n in few:
        student = scores[f"student-{n}"]
        best = max((f"teacher-dpmpp-{n}", f"teacher-ddim-{n}"),
                   key=lambda f: scores[f]["frame_shape"] + scores[f]["frame_clean"])
        gaps = {k: 100 * (student[k] - scores[best][k]) for k in ("frame_shape", "frame_clean")}
        print(f"  {n} steps: shape frames {gaps['frame_shape']:+.1f}, stray-free {gaps['frame_clean']:+.1f} "
              f"(against {best})")


if __name__ == "__main__":
    main()
