"""Training speed of the default synthetic run against the recipe it replaced, side by side.

Each side builds the engine from `train.yaml` (plus its overrides), makes the loop's own training state
and runs the loop's own `train_step` on the synthetic world's batches: `--warmup` steps, then `--steps`
timed ones. Each side runs in its own process (or, with `--processes N`, N torchrun processes sharing the
cores), alternating, `--repeats` times; the best run of each
counts. Prints steps per second, the minutes `max_steps` would take at that speed, and the ratio
default/reference (above 1: the default trains faster).

    python bench/train_speed.py                 # `make train` (compiled, bf16 where native) against the previous recipe
    python bench/train_speed.py --reference "compile_model=true"   # bf16 against float32, both compiled
    python bench/train_speed.py --steps 300 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The default synthetic recipe before issue 11 item 6: the unshifted schedule, 16 text tokens, a linear output
# projection, an eager network.
REFERENCE = ("discretization=zero_snr_unshifted network.max_text_seq_length=16 "
             "conditioner.embedders.0.max_length=16 optim.lr=1e-3 network.head_hidden_dim=0")


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (the Makefile's TRAIN_PRECISION test)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# What `make train` runs: the default with the network compiled, in bf16 where the CPU has it natively.
MEASURED = "compile_model=true" + (" mixed_precision=bf16" if native_bf16() else "")


def side(overrides: list[str], warmup: int, steps: int) -> dict:
    """Time `steps` training steps of the config `train.yaml` + `overrides` in this process."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from vdm.build import build_engine, compose, instantiate
    from vdm.training.data import batch_stream
    from vdm.training.loop import make_train_state, to_device
    from vdm.training.parallel import make_parallel
    from vdm.training.step import train_step

    cfg = compose(overrides, config_name="train")
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    parallel = make_parallel(accelerator, cfg.fsdp, cfg.mixed_precision, cfg.compile_model)
    torch.manual_seed(cfg.seed)
    engine = build_engine(cfg)
    model, state = make_train_state(cfg, engine, parallel)
    stream = iter(batch_stream(instantiate(cfg.data), cfg.batch_size, start=0, seed=cfg.seed, rank=parallel.rank,
                               world_size=parallel.world_size, num_workers=cfg.num_workers))
    model.train()

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            batch = to_device(next(stream), parallel.device)
            train_step(model, engine, state, [batch], parallel, cfg.clip_grad_norm or None)
        return time.perf_counter() - start

    warmup_seconds = run(warmup)  # with the compiled network, this holds the compilation
    seconds = run(steps)
    return {"steps_per_s": steps / seconds, "max_steps": int(cfg.max_steps),
            "warmup_s": warmup_seconds,
            "batch_size": int(cfg.batch_size) * parallel.world_size, "processes": parallel.world_size,
            "parameters": sum(p.numel() for p in engine.network.parameters()), "main": parallel.is_main}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference", default=REFERENCE, help="overrides of the reference recipe")
    parser.add_argument("--overrides", default=MEASURED, help=f"overrides of the measured recipe ({MEASURED!r})")
    parser.add_argument("--processes", type=int, default=1,
                        help="training processes of the measured recipe (torchrun; batch_size is per process)")
    parser.add_argument("--reference-processes", type=int, default=1, help="training processes of the reference")
    parser.add_argument("--master-port", type=int, default=29561)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side is not None:
        print(json.dumps(side(shlex.split(args.side), args.warmup, args.steps)))
        return 0

    recipes = {"default": (args.overrides, args.processes), "reference": (args.reference, args.reference_processes)}
    results: dict[str, list[dict]] = {name: [] for name in recipes}
    for _ in range(args.repeats):
        for name, (overrides, processes) in recipes.items():
            cmd = [__file__, "--side", overrides, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            env = dict(os.environ)
            if processes > 1:
                # One process per core share: torch's threads split the cores instead of competing for them.
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
                cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(processes),
                       "--master_port", str(args.master_port), *cmd]
            else:
                cmd = [sys.executable, *cmd]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if done.returncode:
                print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            results[name].append(next(r for r in reports if r["main"]))
    best = {name: max(runs, key=lambda r: r["steps_per_s"]) for name, runs in results.items()}
    print(f"{args.steps} training steps after {args.warmup} warm-up, best of {args.repeats}")
    for name, r in best.items():
        runs = ", ".join(f"{x['steps_per_s']:.2f}" for x in results[name])
        print(f"{name:>9}: {r['steps_per_s']:.2f} steps/s at batch {r['batch_size']} on {r['processes']} process(es) "
              f"({r['parameters'] / 1e6:.2f}M parameters): {r['max_steps']} steps in "
              f"{r['max_steps'] / r['steps_per_s'] / 60:.1f} min after a {r['warmup_s']:.0f} s warm-up of "
              f"{args.warmup} steps (all runs: {runs})")
        if recipes[name][0]:
            print(f"{'':>11}overrides: {recipes[name][0]}")
    ratio = best["default"]["steps_per_s"] / best["reference"]["steps_per_s"]
    print(f"speed ratio default/reference: {ratio:.2f}x (>1: the default trains faster per step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
