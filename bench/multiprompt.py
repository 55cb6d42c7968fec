"""Multi-prompt sampling: the reuse schedule against the reference schedule, and 1 process against several.

3 prompts, 2 transition blocks, tile 13 / overlap 9 (7 segments on a 37-frame latent), 50 DPM++
steps with CFG, KV-sharing in the reference window (steps 2..25, layers 25..30 of 30 scaled to the
model's depth). Prints each schedule's layer evaluations, wall time, their ratios, and the largest
difference between the two schedules' latents. Then both schedules again with the segment passes of
every step split over 2 (`--processes`) processes (torchrun; gloo on the CPU, NCCL and one GPU each on
CUDA): wall time side by side with 1 process, and the largest difference from the 1-process latents.

    python bench/multiprompt.py [--layers 30] [--steps 50] [--repeats 1] [--processes 1,2] [--device auto]

On 2 CPU cores the processes share the cores (each gets cores / processes threads), so the speed-up is
bounded; on a machine with several GPUs it is the figure that matters.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from vdm.build import build_engine, compose
from vdm.diffusion.multi_prompt import long_latent_frames, plan_segments
from vdm.distributed import Processes, close_processes, init_processes

PROMPTS = ["a red square moving right", "a red square moving down", "a blue circle moving down"]
SCHEDULES = (("reference", False), ("reuse", True))


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=4, help="attention heads of 64 channels each")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--processes", default="1,2", help="process counts to compare, e.g. 1,2,4")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)  # set for the processes torchrun starts ...
    parser.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)  # ... with their share of the cores
    return parser.parse_args(argv)


def setup(args, device: str):
    torch.manual_seed(0)
    engine = build_engine(compose([
        f"network.num_layers={args.layers}", f"network.num_attention_heads={args.heads}",
        "network.attention_head_dim=64", "network.time_embed_dim=128", "network.sample_frames=13", f"sampler.num_steps={args.steps}",
        "sampler.verbose=false", "sampler_multi_prompt.overlap_size=9", "sampler_multi_prompt.num_transition_blocks=2",
    ])).eval()
    with torch.no_grad():  # random weights away from the zero init, so attention matters
        for p in engine.network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine = engine.to(device)
    # the reference window, steps 2..25 (cut to the steps of a short smoke run)
    control = engine.switch_adaln_layer("kv_sharing", start_step=min(2, args.steps - 1), end_step=min(25, args.steps))
    conds, ucs = zip(*(engine.conditioning({"txt": [p]}) for p in PROMPTS))
    frames = long_latent_frames(len(plan_segments(len(PROMPTS), 2)), 13, 9)
    randn = torch.randn(1, frames, 48, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    return engine, control, list(conds), list(ucs), randn


def run_schedules(args, device: str, processes: Processes) -> dict:
    """{schedule: (layer evaluations of this process, best wall time, latent)}."""
    engine, control, conds, ucs, randn = setup(args, device)
    results = {}
    for name, reuse in SCHEDULES:
        sampler = replace(engine.sampler_multi_prompt, reuse=reuse, processes=processes)
        times = []
        for _ in range(args.repeats):
            stats = {}
            processes.barrier()
            sync(device)
            start = time.perf_counter()
            latent = engine.sample_multi_prompt(conds, ucs, randn, tile_size=13, sampler=sampler,
                                                generator=torch.Generator(device).manual_seed(1), stats=stats,
                                                control=control)
            sync(device)
            processes.barrier()
            times.append(time.perf_counter() - start)
        results[name] = (stats.get("layer_evaluations", 0), min(times), latent.cpu())
    return results


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args) -> None:
    """One of the processes torchrun started: the schedules split over all of them; rank 0 saves the results."""
    kind = "cuda" if args.device == "cuda" else "cpu"
    processes = init_processes(kind)
    if kind == "cpu":  # the processes share the cores the single process had
        torch.set_num_threads(max(1, args.worker_threads // processes.world_size))
    try:
        device = processes.device(kind)
        results = run_schedules(args, device, processes)
        mine = torch.tensor([[float(results[n][0]) for n, _ in SCHEDULES]], device=device)  # NCCL: on the GPU
        evaluations = processes.gather(mine, [1] * processes.world_size).cpu()
        if processes.is_main:
            torch.save({"results": results, "evaluations": evaluations.max(0).values.tolist()}, args.worker_out)
    finally:
        close_processes(processes)


def launch(n: int, argv: list[str], device: str) -> dict:
    """The schedules on `n` processes (torchrun): rank 0's results and the most layer evaluations of one process."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "results.pt"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   __file__, *argv, "--device", device, "--worker-out", str(out),
                   "--worker-threads", str(torch.get_num_threads())]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"error: {n} processes failed:\n{result.stderr[-3000:]}")
        return torch.load(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.worker_out:
        worker(args)
        return 0
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    counts = sorted({int(n) for n in args.processes.split(",")})
    if counts[0] < 1:
        raise SystemExit(f"error: --processes={args.processes}; valid: process counts >= 1, e.g. 1,2")

    results = run_schedules(args, device, Processes())
    for name, _ in SCHEDULES:
        evaluations, seconds, _ = results[name]
        print(f"{name:>9}: {evaluations:>7d} layer evaluations, {seconds:7.2f} s")

    (ev_ref, t_ref, z_ref), (ev_new, t_new, z_new) = results["reference"], results["reuse"]
    S = len(plan_segments(len(PROMPTS), 2))
    print(f"segments {S}, long latent {long_latent_frames(S, 13, 9)} frames, {args.layers} layers of width "
          f"{64 * args.heads}, {args.steps} steps, on {device}")
    print(f"layer evaluations: reuse / reference = {ev_new / ev_ref:.3f}  (target <= 0.62)")
    print(f"wall time: reference / reuse = {t_ref / t_new:.2f}x faster  (target >= 1.5)")
    diff = (z_ref - z_new).abs().max().item()
    print(f"max |latent difference| = {diff:.2e} (relative to max |latent| {diff / z_ref.abs().max().item():.1e}; "
          "float32)")

    print(f"\nsegment passes split over processes ({'one GPU each' if device == 'cuda' else 'sharing the CPU cores'}):")
    print(f"{'processes':>9} | {'reference s':>11} | {'reuse s':>9} | {'speed-up':>8} | {'max evals/process':>17} | "
          f"{'max |diff| vs 1':>15}")
    base = {name: results[name][1] for name, _ in SCHEDULES}
    for n in counts:
        if n == 1:
            times, evaluations, diff = base, [results[name][0] for name, _ in SCHEDULES], 0.0
        elif device == "cuda" and torch.cuda.device_count() < n:
            print(f"{n:>9} | skipped: {n} processes need {n} GPUs, this machine has {torch.cuda.device_count()}")
            continue
        else:
            split = launch(n, argv, device)
            times = {name: split["results"][name][1] for name, _ in SCHEDULES}
            evaluations = split["evaluations"]
            diff = max((split["results"][name][2] - results[name][2]).abs().max().item() for name, _ in SCHEDULES)
        print(f"{n:>9} | {times['reference']:>11.2f} | {times['reuse']:>9.2f} | "
              f"{base['reuse'] / times['reuse']:>7.2f}x | {'/'.join(str(int(e)) for e in evaluations):>17} | "
              f"{diff:>15.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
