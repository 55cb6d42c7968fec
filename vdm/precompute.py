"""Encode a dataset once into first-stage latents and caption embeddings for `latent_input=true` training.

    python -m vdm.precompute data=video_folder data.root=<videos> out=<folder> [shard_size=256]
        [overwrite=true] [device=cuda] [first_stage=... conditioner=... any conf/train.yaml override]

Arguments `out`, `shard_size`, `overwrite` and `device` belong to this command; every other argument
is a Hydra override of `conf/train.yaml`, so the first stage, conditioner and data are the ones a
training run with the same overrides would build (the DiT is not built). Each readable video is
encoded UNSCALED in the VAE layout `C T h w` (the engine multiplies by `first_stage.scale_factor` on
load) and each caption by the frozen conditioner (`crossattn`); with `image_to_video=true` (the I2V presets)
also the clip's first frame with SAT's training noise, drawn once per clip from the seeded generator (training
on pixels draws it afresh each step); see `vdm.data.latents` for the folder format. Shards and the index are written to temporary names and renamed when complete; `index.json`
comes last. Then train with `data=latents data.root=<folder> latent_input=true`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vdm.atomic import atomic_path
from vdm.build import compose, crossattn_dim
from vdm.conditioning.image import FIRST_FRAME_KEY, FIRST_FRAME_LOG_SIGMA, noise_first_frame
from vdm.data.latents import CAPTIONS, CROSSATTN, FORMAT, INDEX_FILE, LATENTS, VERSION, shard_name
from vdm.errors import AlreadyExists, BadInput, UserError

log = logging.getLogger(__name__)

OPTIONS = ("out", "shard_size", "overwrite", "device")
TEXT_BATCH = 64  # captions per conditioner call


def _atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` on a hidden temporary file beside `path`, then rename it onto `path`."""
    with atomic_path(path) as tmp:
        write(str(tmp))


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise AlreadyExists(f"out={out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AlreadyExists(f"out={out} is not empty; pass overwrite=true to replace its latents")


def prepare_out(out: Path) -> None:
    """Create `out` and drop a previous index first, so that an interrupted overwrite never leaves an
    index naming a mix of old and new shards."""
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_FILE).unlink(missing_ok=True)


def caption_key(conditioner) -> str:
    """The one batch key the conditioner's embedders read (the caption)."""
    crossattn_dim(conditioner)  # fails with a clear message when there is no text context
    keys = sorted({e.input_key for e in conditioner.embedders})
    if len(keys) != 1:
        raise BadInput(f"conditioner embedders read keys {keys}; precompute stores one caption key, so every "
                       "embedder must read the same one")
    return keys[0]


@torch.no_grad()
def embed_captions(conditioner, key: str, captions: list[str]) -> torch.Tensor:
    """(N, L, D) float32 on CPU: the frozen conditioner's crossattn, without ucg dropout."""
    parts = [conditioner({key: captions[i:i + TEXT_BATCH]})[CROSSATTN].float().cpu()
             for i in range(0, len(captions), TEXT_BATCH)]
    return torch.cat(parts)


def write_shard(path: Path, latents: list[torch.Tensor], crossattn: torch.Tensor, captions: list[str],
                first_frames: list[torch.Tensor] = ()) -> None:
    tensors = {LATENTS: torch.stack(latents).contiguous(), CROSSATTN: crossattn.contiguous()}
    if first_frames:
        tensors[FIRST_FRAME_KEY] = torch.stack(first_frames).contiguous()
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={CAPTIONS: json.dumps(captions)}))


def _build(node: DictConfig):
    """`instantiate`, re-raising the target's own error (one line) instead of Hydra's wrapper."""
    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, FileNotFoundError, FileExistsError, KeyError)):
            raise e.__cause__ from None
        raise


def _container(node) -> dict | None:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


@torch.no_grad()
def precompute(cfg: DictConfig, out: str | os.PathLike, shard_size: int = 256, overwrite: bool = False,
               device: str | None = None) -> Path:
    """Encode `cfg.data` with `cfg.first_stage.model` and `cfg.conditioner` into `out`; returns the index path."""
    if shard_size < 1:
        raise BadInput(f"shard_size={shard_size} must be a positive integer")
    out = Path(out)
    check_out(out, overwrite)  # before anything slow is built
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(int(cfg.seed))  # a sampling VAE posterior draws reproducibly

    dataset = _build(cfg.data)
    first_stage = _build(cfg.first_stage.model).eval().requires_grad_(False).to(device)
    conditioner = _build(cfg.conditioner).eval().requires_grad_(False).to(device)
    text_key, input_key = caption_key(conditioner), cfg.input_key
    prepare_out(out)

    shards: list[dict] = []
    latents: list[torch.Tensor] = []
    first_frames: list[torch.Tensor] = []  # image_to_video: each clip's noised first frame, encoded
    captions: list[str] = []
    image_to_video = bool(cfg.get("image_to_video", False))
    shape, crossattn_shape = None, None

    def flush() -> None:
        nonlocal crossattn_shape
        name = shard_name(len(shards))
        crossattn = embed_captions(conditioner, text_key, captions)
        crossattn_shape = list(crossattn.shape[1:])
        write_shard(out / name, latents, crossattn, captions, first_frames)
        shards.append({"file": name, "num_samples": len(captions)})
        latents.clear()
        first_frames.clear()
        captions.clear()

    loader = DataLoader(dataset, batch_size=None, num_workers=int(cfg.num_workers))  # items in order, unbatched
    for i, item in enumerate(tqdm(loader, total=len(dataset), desc="precompute", disable=None)):
        for key in (input_key, text_key):
            if key not in item:
                raise BadInput(f"dataset item {i} has no key {key!r} (has {sorted(item)}); check input_key and "
                               "the conditioner's input_key")
        video = rearrange(item[input_key], "t c h w -> 1 c t h w").to(device)
        z = first_stage.encode(video)[0].float().cpu()  # (C, T, h, w), unscaled
        if shape is None:
            shape = tuple(z.shape)
        elif tuple(z.shape) != shape:
            raise BadInput(f"dataset item {i} encodes to latents {tuple(z.shape)} but item 0 to {shape}; "
                           "every item must have the same frame count and size")
        latents.append(z)
        if image_to_video:
            frame = noise_first_frame(video[:, :, 0].float()).to(video.dtype)
            first_frames.append(first_stage.encode(frame[:, :, None])[0].float().cpu())  # (C, 1, h, w), unscaled
        captions.append(str(item[text_key]))
        if len(captions) == shard_size:
            flush()
    if captions:
        flush()
    if not shards:
        raise BadInput(f"data ({cfg.data.get('_target_')}) holds no items; nothing to precompute")
    written = {s["file"] for s in shards}
    for stale in out.glob("shard-*.safetensors"):  # left by an overwritten, larger run
        if stale.name not in written:
            stale.unlink()

    unreadable = getattr(dataset, "unreadable", [])
    index = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": sum(s["num_samples"] for s in shards),
        "shard_size": shard_size,
        "shards": shards,
        "latent_shape": list(shape),
        "crossattn_shape": crossattn_shape,
        "input_key": input_key,
        "text_key": text_key,
        "first_frame": ({"key": FIRST_FRAME_KEY, "log_sigma": list(FIRST_FRAME_LOG_SIGMA), "draws": "one per clip"}
                        if image_to_video else None),
        "counts": {"listed": len(dataset) + len(unreadable), "unreadable": len(unreadable),
                   "written": sum(s["num_samples"] for s in shards)},
        "first_stage": _container(cfg.first_stage),
        "conditioner": _container(cfg.conditioner),
        "data": _container(cfg.data),
        "seed": int(cfg.seed),
    }
    path = out / INDEX_FILE
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2), encoding="utf-8"))
    log.info("wrote %d samples in %d shards to %s (latents %s)", index["num_samples"], len(shards), out, shape)
    return path


def parse_args(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """Split `key=value` arguments into this command's options and Hydra overrides."""
    options: dict = {"shard_size": 256, "overwrite": False, "device": None}
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in OPTIONS:
            if key == "shard_size":
                options[key] = int(value)
            elif key == "overwrite":
                if value.lower() not in ("true", "false"):
                    raise BadInput(f"overwrite={value!r}; valid: true, false")
                options[key] = value.lower() == "true"
            else:
                options[key] = value
        else:
            overrides.append(arg)
    if not options.get("out"):
        raise BadInput("out=<folder> is required: where the latents are written")
    return options, overrides


def main(argv: Sequence[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        sys.exit(0)
    options, overrides = parse_args(argv)
    cfg = compose(overrides, config_name="train")
    return precompute(cfg, **options)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        main()
    except UserError as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
