"""Multi-prompt sampling: the reuse schedule against the reference schedule, side by side.

3 prompts, 2 transition blocks, tile 13 / overlap 9 (7 segments on a 37-frame latent), 50 DPM++
steps with CFG, KV-sharing in the reference window (steps 2..25, layers 25..30 of 30 scaled to the
model's depth). Prints each schedule's layer evaluations, wall time, their ratios, and the largest
difference between the two schedules' latents.

    python bench/multiprompt.py [--layers 30] [--steps 50] [--repeats 1]
"""

import argparse
import time
from dataclasses import replace

import torch

from vdm.build import build_engine, compose
from vdm.diffusion.multi_prompt import long_latent_frames, plan_segments

PROMPTS = ["a red square moving right", "a red square moving down", "a blue circle moving down"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=4, help="attention heads of 64 channels each")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    engine = build_engine(compose([
        f"network.num_layers={args.layers}", f"network.num_attention_heads={args.heads}",
        "network.attention_head_dim=64", "network.time_embed_dim=128", "network.sample_frames=13", f"sampler.num_steps={args.steps}",
        "sampler.verbose=false", "sampler_multi_prompt.overlap_size=9", "sampler_multi_prompt.num_transition_blocks=2",
    ])).eval()
    with torch.no_grad():  # random weights away from the zero init, so attention matters
        for p in engine.network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.switch_adaln_layer("kv_sharing", start_step=2, end_step=25)

    conds, ucs = zip(*(engine.conditioning({"txt": [p]}) for p in PROMPTS))
    S = len(plan_segments(len(PROMPTS), 2))
    frames = long_latent_frames(S, 13, 9)
    randn = torch.randn(1, frames, 48, 8, 8, generator=torch.Generator().manual_seed(0))

    results = {}
    for name, reuse in (("reference", False), ("reuse", True)):
        sampler = replace(engine.sampler_multi_prompt, reuse=reuse)
        times = []
        for _ in range(args.repeats):
            stats = {}
            start = time.perf_counter()
            latent = engine.sample_multi_prompt(list(conds), list(ucs), randn, tile_size=13, sampler=sampler,
                                                generator=torch.Generator().manual_seed(1), stats=stats)
            times.append(time.perf_counter() - start)
        results[name] = (stats["layer_evaluations"], min(times), latent)
        print(f"{name:>9}: {stats['layer_evaluations']:>7d} layer evaluations, {min(times):7.2f} s")

    (ev_ref, t_ref, z_ref), (ev_new, t_new, z_new) = results["reference"], results["reuse"]
    print(f"segments {S}, long latent {frames} frames, {args.layers} layers of width {64 * args.heads}, "
          f"{args.steps} steps")
    print(f"layer evaluations: reuse / reference = {ev_new / ev_ref:.3f}  (target <= 0.62)")
    print(f"wall time: reference / reuse = {t_ref / t_new:.2f}x faster  (target >= 1.5)")
    diff = (z_ref - z_new).abs().max().item()
    print(f"max |latent difference| = {diff:.2e} (relative to max |latent| {diff / z_ref.abs().max().item():.1e}; "
          "float32)")


if __name__ == "__main__":
    main()
