"""GPU check at CogVideoX-2B scale (random weights, 49 frames at 480x720 -> 13x60x90 latents).

Prints, for vdm's DiffusionTransformer and diffusers' CogVideoXTransformer3DModel measured in the same
run: seconds per sampling step with CFG (batch 2, bf16), and the peak memory and time of one LoRA
training step (rank 128, bf16, per-block gradient checkpointing, batch 1), with their ratios.
Exits 0 with a message when no CUDA GPU is present.

    bash bench/gpu_check.sh   (or: python bench/gpu_check.py [--layers 30] [--repeats 5])
"""

import argparse
import sys
import time

import torch

HPARAMS = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
               text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49,
               patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
               spatial_interpolation_scale=1.875, use_rotary_positional_embeddings=False)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


LATENT = (13, 60, 90)  # 49 frames at 480x720 through the CogVideoX VAE


def inputs(batch: int, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, LATENT[0], 16, *LATENT[1:], device=device, dtype=torch.bfloat16, generator=g)
    context = torch.randn(batch, 226, 4096, device=device, dtype=torch.bfloat16, generator=g)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    return x, context, t


def vdm_model(layers: int, checkpointing: bool):
    from vdm.networks import DiffusionTransformer
    return DiffusionTransformer(**{**HPARAMS, "num_layers": layers}, gradient_checkpointing=checkpointing)


def diffusers_model(layers: int, checkpointing: bool):
    from diffusers import CogVideoXTransformer3DModel
    model = CogVideoXTransformer3DModel(**{**HPARAMS, "num_layers": layers})
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def call(model, x, context, t):
    if type(model).__name__ == "DiffusionTransformer":
        return model(x, t, context)
    return model(x, context, t, return_dict=False)[0]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_sampling_step(model, repeats: int, device: str) -> float:
    x, context, t = inputs(2, device)
    with torch.no_grad():
        for _ in range(2):
            call(model, x, context, t)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            call(model, x, context, t)
        synchronize(device)
    return (time.perf_counter() - start) / repeats


def lora_step(model, device: str) -> tuple[float, float]:
    """Peak GiB and seconds of one LoRA training step (forward + backward + AdamW step)."""
    from peft import LoraConfig, inject_adapter_in_model
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=128, lora_alpha=64, target_modules=TARGETS), model)
    model.to(device, torch.bfloat16).train()
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, context, t = inputs(1, device)
    target = torch.randn_like(x)
    for _ in range(2):  # the second step is measured: the optimizer state exists by then
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        synchronize(device)
        start = time.perf_counter()
        loss = (call(model, x, context, t).float() - target.float()).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return peak, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (no memory figures)")
    parser.add_argument("--latent", default="13,60,90", help="latent T,H,W (smaller for a smoke run)")
    args = parser.parse_args(argv)
    global LATENT
    LATENT = tuple(int(v) for v in args.latent.split(","))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU present; nothing measured")
        return 0
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {name}; CogVideoX-2B config, {args.layers} layers, {'x'.join(map(str, LATENT))} latents")
    results = {}
    for name, build in (("vdm", vdm_model), ("diffusers", diffusers_model)):
        torch.manual_seed(0)
        model = build(args.layers, checkpointing=False).to(args.device, torch.bfloat16).eval()
        step = time_sampling_step(model, args.repeats, args.device)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
        model = build(args.layers, checkpointing=True)
        peak, seconds = lora_step(model, args.device)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
        results[name] = (step, peak, seconds)
        print(f"{name:>9}: {step:.3f} s per CFG sampling step | LoRA step with checkpointing: "
              f"peak {peak:.2f} GiB, {seconds:.2f} s")
    (s_v, m_v, t_v), (s_d, m_d, t_d) = results["vdm"], results["diffusers"]
    print(f"ratios vdm/diffusers: sampling step time {s_v / s_d:.2f}, LoRA peak memory {m_v / m_d:.2f}, "
          f"LoRA step time {t_v / t_d:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
