"""Sampling speed: vdm (`sample.py`'s code path) against diffusers' CogVideoXPipeline on the same folder.

One random CogVideoX folder in the released layout (a mid-size config on the CPU, the 2B config on CUDA),
sampled by both with the same steps, CFG scale, scheduler (DDIM, diffusers' full-table grid) and dtype.
Each side runs in its own process (so peak memory is its own), alternating, `--repeats` times; the best
run of each counts. Prints seconds per step, peak memory and the speed ratio diffusers/vdm (above 1:
vdm is faster). The text encoder runs once, outside the timed loop, on both sides.

    python bench/sample_speed.py                       # CPU: mid-size, fp32, 10 steps
    python bench/sample_speed.py --config 2b --dtype bf16 --steps 50   # on a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.cogvideox_folder writes the released layout

PROMPT = "a panda playing guitar in a bamboo forest"
SCALE = 6.0
CONFIGS = {  # transformer configs (diffusers names); "tiny" is for the smoke test
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
                 text_embed_dim=32, num_layers=2, sample_width=8, sample_height=6, sample_frames=9,
                 max_text_seq_length=16, patch_size=2),
    "mid": dict(num_attention_heads=8, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
                text_embed_dim=256, num_layers=8, sample_width=48, sample_height=32, sample_frames=17,
                max_text_seq_length=226, patch_size=2),
    "2b": dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
               text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49,
               max_text_seq_length=226, patch_size=2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: str) -> float:
    """GiB: the CUDA allocator's peak during sampling, or the process's peak resident memory on the CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_vdm(folder: Path, steps: int, dtype: torch.dtype, device: str) -> float:
    from vdm.build import compose
    from vdm.sampling import latent_shape, load_model, make_sampler

    loaded = load_model(str(folder), None, "runs", device=device, dtype=dtype)
    engine = loaded.engine
    options = compose(["sampler=ddim", "sampler.verbose=false", "guider=cfg"])
    sampler = make_sampler(loaded.config, options.sampler, steps, SCALE, options.guider, rescale="full")
    shape = latent_shape(engine, None, None, None)
    cond, uc = engine.conditioning({"txt": [PROMPT]})
    randn = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    engine.sample_single(cond, uc, randn, sampler=sampler, num_steps=2)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    engine.sample_single(cond, uc, randn, sampler=sampler)
    sync(device)
    return time.perf_counter() - start


def run_diffusers(folder: Path, steps: int, dtype: torch.dtype, device: str) -> float:
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    c = pipe.transformer.config
    cond, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=c.max_text_seq_length,
                                 device=device, dtype=dtype)

    def sample(n: int):
        with torch.no_grad():
            pipe(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond), num_frames=c.sample_frames,
                 num_inference_steps=n, guidance_scale=SCALE, use_dynamic_cfg=False, output_type="latent",
                 generator=torch.Generator(device=device).manual_seed(0))

    sample(2)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    sample(steps)
    sync(device)
    return time.perf_counter() - start


def side(args) -> None:
    """One measurement in this process; prints a JSON line."""
    torch.set_num_threads(torch.get_num_threads())
    run = run_vdm if args.side == "vdm" else run_diffusers
    seconds = run(Path(args.folder), args.steps, DTYPES[args.dtype], args.device)
    print(json.dumps({"s_per_step": seconds / args.steps, "peak_gib": peak_memory(args.device)}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default=None, help="default: 2b on CUDA, mid on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folder", default=None, help="an existing CogVideoX folder (default: a random one)")
    parser.add_argument("--side", choices=["vdm", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.config = args.config or ("2b" if args.device == "cuda" else "mid")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.side:
        side(args)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "CogVideoX"
        if not args.folder:
            from tests.cogvideox_folder import make_cogvideox_folder

            make_cogvideox_folder(folder, "2b", transformer=CONFIGS[args.config])
        results = {"vdm": [], "diffusers": []}
        for _ in range(args.repeats):
            for name in results:
                cmd = [sys.executable, __file__, "--side", name, "--folder", str(folder), "--steps", str(args.steps),
                       "--dtype", args.dtype, "--device", args.device]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                    return 1
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {name: min(runs, key=lambda r: r["s_per_step"]) for name, runs in results.items()}
    print(f"config {args.config}, {args.device}, {args.dtype}, {args.steps} DDIM steps with CFG {SCALE}, "
          f"best of {args.repeats}")
    for name, r in best.items():
        runs = ", ".join(f"{x['s_per_step']:.4f}" for x in results[name])
        print(f"{name:>9}: {r['s_per_step']:.4f} s/step, peak memory {r['peak_gib']:.2f} GiB  (all runs: {runs})")
    ratio = best["diffusers"]["s_per_step"] / best["vdm"]["s_per_step"]
    print(f"speed ratio diffusers/vdm: {ratio:.3f}x (>1: vdm faster); memory ratio vdm/diffusers: "
          f"{best['vdm']['peak_gib'] / best['diffusers']['peak_gib']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
