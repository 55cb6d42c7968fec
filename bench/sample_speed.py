"""Sampling speed: vdm (`sample.py`'s code path) against diffusers' CogVideoXPipeline on the same folder.

One random CogVideoX folder in the released layout (a mid-size config on the CPU, the 2B config on CUDA),
sampled by both with the same steps, CFG scale, scheduler (DDIM, diffusers' full-table grid) and dtype.
Each side runs in its own process (so peak memory is its own), alternating, `--repeats` times; the best
run of each counts. Prints seconds per step, peak memory and the speed ratio diffusers/vdm (above 1:
vdm is faster). The text encoder runs once, outside the timed loop, on both sides.

    python bench/sample_speed.py                       # CPU: mid-size, fp32, 10 steps
    python bench/sample_speed.py --config 2b --dtype bf16 --steps 50   # on a CUDA GPU
    python bench/sample_speed.py --cache none first_block:0.1 pab:2 teacache:0.1   # with step caches

`--cache` settings (`name:value`; the value is first_block's and teacache's threshold, pab's block_skip_range
over timesteps (100, 800)) run on both sides with the same settings: diffusers' `transformer.enable_cache(
FirstBlockCacheConfig | PyramidAttentionBroadcastConfig)`; TeaCache has no diffusers hook, so its row sets vdm
against diffusers uncached (TeaCache's coefficients: the 2B ones, whatever the config).

`--processes N --parallel cfg|ulysses` sets vdm on one process against vdm on N (`torchrun`: gloo on the CPU,
NCCL with one GPU each on CUDA) splitting the one video by its guidance branches (cfg, N = 2) or its tokens
(ulysses, N dividing the heads), side by side, each cache setting a row; it prints the speed-up and how far the
N-process latent is from the one-process one. On the CPU the processes share the machine's cores (the one
process uses them all), so the figure there says what the communication costs, not what N GPUs gain.

    python bench/sample_speed.py --processes 2 --parallel ulysses
"""

from __future__ import annotations

import argparse
import json
import os
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


def parse_cache(spec: str) -> tuple[str, float | None]:
    name, _, value = spec.partition(":")
    if name not in ("none", "first_block", "pab", "teacache") or (name != "none" and not value):
        raise SystemExit(f"--cache {spec}: give none, first_block:<threshold>, pab:<block_skip_range> or "
                         "teacache:<threshold>")
    return name, float(value) if value else None


def vdm_cache(spec: str, num_layers: int, steps: int, group=None):
    from vdm.networks.caches import make_cache

    name, value = parse_cache(spec)
    if name == "none":
        return None
    options = {"pab": {"block_skip_range": int(value or 2)}}.get(name, {"threshold": value})
    return make_cache(name, options, num_layers, steps, "cogvideox_2b", group)


def run_vdm(folder: Path, steps: int, dtype: torch.dtype, device: str, cache: str = "none",
            parallel: str | None = None, latent_file: str | None = None) -> tuple[float, int]:
    """vdm's sampling time and block evaluations (on this process); with `parallel` (cfg / ulysses), this
    process's share of one video sampled by every process of the `torchrun` job; `latent_file`: where rank 0
    saves the latent."""
    from dataclasses import replace

    from vdm.build import compose
    from vdm.distributed import Processes, init_processes, split_processes
    from vdm.sampling import latent_shape, load_model, make_sampler

    processes = init_processes(device) if parallel else Processes()
    mesh = split_processes(processes, 2 if parallel == "cfg" else 1,
                           processes.world_size if parallel == "ulysses" else 1)
    device = processes.device(device)
    loaded = load_model(str(folder), None, "runs", device=device, dtype=dtype)
    engine = loaded.engine
    options = compose(["sampler=ddim", "sampler.verbose=false", "guider=cfg"])
    sampler = make_sampler(loaded.config, options.sampler, steps, SCALE, options.guider, rescale="full")
    if parallel == "cfg":
        sampler = replace(sampler, branches=mesh.branches)
    shape = latent_shape(engine, None, None, None)
    cond, uc = engine.conditioning({"txt": [PROMPT]})
    randn = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    engine.sample_single(cond, uc, randn, sampler=sampler, num_steps=2, sequence=mesh.sequence)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    step_cache = vdm_cache(cache, engine.network.config.num_layers, steps, mesh.video)
    processes.barrier()
    sync(device)
    start = time.perf_counter()
    latent = engine.sample_single(cond, uc, randn, sampler=sampler, cache=step_cache, sequence=mesh.sequence)
    sync(device)
    seconds = time.perf_counter() - start
    if latent_file and processes.is_main:
        torch.save(latent.float().cpu(), latent_file)
    return seconds, steps * engine.network.config.num_layers if step_cache is None else step_cache.evaluations


def run_diffusers(folder: Path, steps: int, dtype: torch.dtype, device: str, cache: str = "none") -> tuple[float, int]:
    from diffusers import CogVideoXPipeline
    from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    pipe = CogVideoXPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    name, value = parse_cache(cache)
    if name == "first_block":
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=value))
    elif name == "pab":
        pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=int(value), spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: pipe.current_timestep))
    blocks = []  # the blocks that ran: every block's feed-forward runs when its block does
    for block in pipe.transformer.transformer_blocks:
        block.ff.register_forward_pre_hook(lambda *_: blocks.append(1))
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
    blocks.clear()
    start = time.perf_counter()
    sample(steps)
    sync(device)
    return time.perf_counter() - start, len(blocks)


def side(args) -> None:
    """One measurement in this process; prints a JSON line."""
    torch.set_num_threads(torch.get_num_threads())
    (cache,) = args.cache
    if args.side == "vdm":
        seconds, blocks = run_vdm(Path(args.folder), args.steps, DTYPES[args.dtype], args.device, cache,
                                  args.parallel, args.latent_file)
    else:
        seconds, blocks = run_diffusers(Path(args.folder), args.steps, DTYPES[args.dtype], args.device, cache)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"s_per_step": seconds / args.steps, "peak_gib": peak_memory(args.device),
                          "blocks": blocks}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default=None, help="default: 2b on CUDA, mid on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folder", default=None, help="an existing CogVideoX folder (default: a random one)")
    parser.add_argument("--cache", nargs="+", default=["none"], help="step caches: none first_block:0.1 pab:2 "
                        "teacache:0.1 (each a row)")
    parser.add_argument("--processes", type=int, default=1, help="> 1: vdm on 1 process against vdm on this many")
    parser.add_argument("--parallel", choices=["cfg", "ulysses"], default=None,
                        help="with --processes: split the video by its guidance branches or its tokens")
    parser.add_argument("--side", choices=["vdm", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--latent-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.side and ((args.processes > 1) != bool(args.parallel) or (args.parallel == "cfg" and args.processes != 2)):
        parser.error("--processes N > 1 goes with --parallel cfg (N = 2) or --parallel ulysses, and only with them")
    args.config = args.config or ("2b" if args.device == "cuda" else "mid")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.side:
        side(args)
        return 0

    if args.parallel:
        return compare_processes(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = benchmark_folder(args, Path(tmp))
        results = {(spec, name): [] for spec in args.cache for name in ("vdm", "diffusers")}
        for _ in range(args.repeats):
            for spec, name in results:
                diffusers_spec = "none" if spec.startswith("teacache") else spec  # no diffusers TeaCache hook
                cmd = [sys.executable, __file__, "--side", name, "--folder", str(folder), "--steps", str(args.steps),
                       "--dtype", args.dtype, "--device", args.device,
                       "--cache", spec if name == "vdm" else diffusers_spec]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    print(f"{name} ({spec}) failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                    return 1
                results[spec, name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {key: min(runs, key=lambda r: r["s_per_step"]) for key, runs in results.items()}
    print(f"config {args.config}, {args.device}, {args.dtype}, {args.steps} DDIM steps with CFG {SCALE}, "
          f"best of {args.repeats}")
    for spec in args.cache:
        print(f"-- cache {spec}" + (" (diffusers: uncached, it has no TeaCache)" if spec.startswith("teacache") else ""))
        for name in ("vdm", "diffusers"):
            r = best[spec, name]
            runs = ", ".join(f"{x['s_per_step']:.4f}" for x in results[spec, name])
            print(f"{name:>9}: {r['s_per_step']:.4f} s/step, {r['blocks']} block evaluations, peak memory "
                  f"{r['peak_gib']:.2f} GiB  (all runs: {runs})")
        vdm, ref = best[spec, "vdm"], best[spec, "diffusers"]
        print(f"speed ratio diffusers/vdm: {ref['s_per_step'] / vdm['s_per_step']:.3f}x (>1: vdm faster); memory "
              f"ratio vdm/diffusers: {vdm['peak_gib'] / ref['peak_gib']:.3f}")
    return 0


def benchmark_folder(args, tmp: Path) -> Path:
    """`--folder`, or a random CogVideoX folder of `--config` in `tmp`; the `--cache` settings checked."""
    for spec in args.cache:
        parse_cache(spec)
    if args.folder:
        return Path(args.folder)
    from tests.cogvideox_folder import make_cogvideox_folder

    return make_cogvideox_folder(tmp / "CogVideoX", "2b", transformer=CONFIGS[args.config])


def compare_processes(args) -> int:
    """vdm on one process against vdm on `args.processes` splitting the video (`args.parallel`), alternating,
    `args.repeats` times; prints s/step, the speed-up and the latents' largest relative difference."""
    torchrun = Path(sys.executable).with_name("torchrun")
    with tempfile.TemporaryDirectory() as tmp:
        folder = benchmark_folder(args, Path(tmp))
        results = {(spec, n): [] for spec in args.cache for n in (1, args.processes)}
        differences = {}
        for _ in range(args.repeats):
            for spec, n in results:
                latent = Path(tmp) / f"latent_{n}.pt"
                side = [__file__, "--side", "vdm", "--folder", str(folder), "--steps", str(args.steps), "--dtype",
                        args.dtype, "--device", args.device, "--cache", spec, "--latent-file", str(latent)]
                cmd = [sys.executable, *side] if n == 1 else \
                    [str(torchrun), "--standalone", "--nproc_per_node", str(n), *side, "--parallel", args.parallel]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    print(f"{n} process(es) ({spec}) failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                    return 1
                results[spec, n].append(json.loads(done.stdout.strip().splitlines()[-1]))
                if n > 1:
                    a, b = torch.load(Path(tmp) / "latent_1.pt"), torch.load(latent)
                    differences[spec] = ((a - b).abs().max() / a.abs().max()).item()
    best = {key: min(runs, key=lambda r: r["s_per_step"]) for key, runs in results.items()}
    print(f"config {args.config}, {args.device}, {args.dtype}, {args.steps} DDIM steps with CFG {SCALE}, "
          f"1 process against {args.processes} ({args.parallel}), best of {args.repeats}")
    for spec in args.cache:
        print(f"-- cache {spec}")
        for n in (1, args.processes):
            r = best[spec, n]
            runs = ", ".join(f"{x['s_per_step']:.4f}" for x in results[spec, n])
            print(f"{n:>2} process{'es' if n > 1 else '  '}: {r['s_per_step']:.4f} s/step, {r['blocks']} block "
                  f"evaluations (rank 0), peak memory {r['peak_gib']:.2f} GiB (rank 0)  (all runs: {runs})")
        one, many = best[spec, 1], best[spec, args.processes]
        print(f"speed-up 1 -> {args.processes} processes: {one['s_per_step'] / many['s_per_step']:.3f}x; latent "
              f"difference (max relative): {differences[spec]:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
