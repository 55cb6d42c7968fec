"""LoRA adapters between vdm and diffusers' CogVideoX loader (`CogVideoXPipeline.load_lora_weights`; the same
file loads in `CogVideoXImageToVideoPipeline` for CogVideoX-5B-I2V and 1.5-5B-I2V, and CogVideoX 1.5's adapters
have the same module names).

vdm's adapters are peft layers injected by `vdm.networks.lora.add_lora`, so a LoRA run saves
`transformer_blocks.0.attn1.to_q.lora_A.default.weight`. diffusers' `pytorch_lora_weights.safetensors`
holds the same tensors as `transformer.transformer_blocks.0.attn1.to_q.lora_A.weight`, and carries the
peft config (rank `r`, `lora_alpha`, `target_modules`) as JSON under the safetensors metadata key
`lora_adapter_metadata`, every entry prefixed `transformer.`. diffusers 0.42 builds its `LoraConfig` from
that metadata alone; without it (older files) it takes alpha = rank, so the scale alpha/rank is lost.

    python -m vdm.networks.lora_interop export runs/<run>/checkpoints/step-N <out dir> [--ema]
    python -m vdm.networks.lora_interop import <diffusers lora file or dir> <out .safetensors>

In Python: `save_diffusers_lora(checkpoint_or_state, out)`, then `pipe.load_lora_weights(out)` in
diffusers; `load_diffusers_lora(network, path)` injects and loads a diffusers LoRA into vdm's DiT.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from vdm.atomic import atomic_path
from vdm.errors import BadInput, NotFound, UserError
from vdm.networks.diffusers_io import check_diffusers_exportable
from vdm.networks.lora import add_lora, lora_state_dict
from vdm.runs import load_weights

log = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"  # CogVideoXLoraLoaderMixin.transformer_name
ADAPTER = "default"  # the peft adapter name add_lora injects

_VDM_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")
_DIFFUSERS_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")


def _parse(state: dict[str, torch.Tensor], pattern: re.Pattern, expected: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"lora_A": (r, in), "lora_B": (out, r)}}, refusing keys that are not LoRA weights."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    adapters = set()
    for key, value in state.items():
        match = pattern.match(key)
        if match is None:
            raise BadInput(f"key {key!r} is not a LoRA weight; expected {expected!r}")
        if "adapter" in pattern.groupindex:
            adapters.add(match["adapter"])
        if value.ndim != 2:
            raise BadInput(f"key {key!r} has shape {tuple(value.shape)}; LoRA weights are 2-D")
        modules.setdefault(match["module"], {})[match["kind"]] = value
    if len(adapters) > 1:
        raise BadInput(f"the state holds several peft adapters {sorted(adapters)}; export one at a time")
    for module, pair in modules.items():
        for kind in ("lora_A", "lora_B"):
            if kind not in pair:
                raise BadInput(f"module {module!r} has no {kind} weight (a LoRA adapter needs lora_A and lora_B)")
        if pair["lora_A"].shape[0] != pair["lora_B"].shape[1]:
            raise BadInput(f"module {module!r}: lora_A shape {tuple(pair['lora_A'].shape)} and lora_B shape "
                           f"{tuple(pair['lora_B'].shape)} disagree on the rank")
    if not modules:
        raise BadInput("the state holds no LoRA weights")
    return modules


def _uniform_rank(modules: dict[str, dict[str, torch.Tensor]]) -> int:
    ranks = {module: pair["lora_A"].shape[0] for module, pair in modules.items()}
    first = next(iter(ranks))
    for module, r in ranks.items():
        if r != ranks[first]:
            raise BadInput(f"adapters have different ranks ({first!r}: {ranks[first]}, {module!r}: {r}); "
                           "vdm's add_lora uses one rank for all modules")
    return ranks[first]


def target_names(modules) -> list[str]:
    """Short target names as `lora.target_modules` spells them (`to_q`, `to_out.0`)."""
    names = set()
    for module in modules:
        parts = module.split(".")
        names.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(names)


def to_diffusers_lora(state: dict[str, torch.Tensor], rank: int, alpha: float) -> tuple[dict, dict]:
    """vdm/peft adapter weights -> (diffusers state dict, diffusers `lora_adapter_metadata`).

    `target_modules` in the metadata lists the exact module paths, so diffusers injects adapters into
    these modules and no others.
    """
    modules = _parse(state, _VDM_KEY, "<module>.lora_A.default.weight")
    found = _uniform_rank(modules)
    if found != rank:
        raise BadInput(f"rank={rank} but the adapter weights have rank {found}")
    out = {f"{PREFIX}.{module}.{kind}.weight": tensor.detach().contiguous().cpu()
           for module, pair in sorted(modules.items()) for kind, tensor in sorted(pair.items())}
    config = {"r": int(rank), "lora_alpha": float(alpha), "target_modules": sorted(modules),
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False}
    return out, {f"{PREFIX}.{k}": v for k, v in config.items()}


def _read_run_lora(checkpoint: Path) -> tuple[int | None, float | None]:
    """`lora.rank` and `lora.alpha` of the run that wrote `<run>/checkpoints/step-N` (None when absent)."""
    config_file = checkpoint.parent.parent / "config.yaml"
    if not config_file.is_file():
        return None, None
    cfg = OmegaConf.load(config_file)
    if not cfg.get("lora_train", True):
        raise BadInput(f"{config_file}: lora_train is false; {checkpoint} holds full weights, not a LoRA adapter")
    check_diffusers_exportable(cfg.get("network", {}), f"an adapter of it ({checkpoint})")
    lora = cfg.get("lora") or {}
    rank = lora.get("rank")
    alpha = lora.get("alpha")
    return rank, (rank if alpha is None else alpha)


def _pick(name: str, given, from_config, source: Path):
    if given is not None and from_config is not None and float(given) != float(from_config):
        raise BadInput(f"{name}={given} disagrees with lora.{name}={from_config} in {source}")
    return given if given is not None else from_config


def _write_atomic(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """Write under a temporary name in the same folder and rename, so a reader never sees half a file."""
    with atomic_path(file) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save_diffusers_lora(checkpoint_or_state: str | os.PathLike | dict, path: str | os.PathLike,
                        rank: int | None = None, alpha: float | None = None, ema: bool = False) -> Path:
    """Write a diffusers `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(path)`.

    `checkpoint_or_state` is a LoRA run's checkpoint folder (`<run>/checkpoints/step-N`; rank and alpha
    come from `<run>/config.yaml` unless given; `ema=True` exports `ema.safetensors`) or a vdm LoRA state
    dict (rank defaults to the weights' rank; alpha is required). `path` is the output folder, or a file
    name ending in `.safetensors`. Returns the file written.
    """
    if isinstance(checkpoint_or_state, dict):
        state = checkpoint_or_state
        if alpha is None:
            raise BadInput("alpha is required when saving a state dict (vdm's lora.alpha; null there means rank)")
    else:
        checkpoint = Path(checkpoint_or_state)
        file = checkpoint / ("ema.safetensors" if ema else "model.safetensors")
        state = {k: v for k, v in load_weights(file).items() if not k.startswith("__")}  # EMA's counter
        run_rank, run_alpha = _read_run_lora(checkpoint)
        rank = _pick("rank", rank, run_rank, checkpoint.parent.parent / "config.yaml")
        alpha = _pick("alpha", alpha, run_alpha, checkpoint.parent.parent / "config.yaml")
        if alpha is None:
            raise BadInput(f"{checkpoint}: no <run>/config.yaml with lora.alpha; pass alpha (and rank)")
    if rank is None:
        rank = _uniform_rank(_parse(state, _VDM_KEY, "<module>.lora_A.default.weight"))
    tensors, metadata = to_diffusers_lora(state, rank, alpha)
    out = Path(path)
    file = out if out.suffix == ".safetensors" else out / WEIGHT_NAME
    _write_atomic(tensors, file, {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
    log.info("wrote %d adapter tensors (rank %d, alpha %g) to %s", len(tensors), rank, alpha, file)
    return file


def _lora_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise NotFound(f"{path}: no such LoRA file or folder")
    if (path / WEIGHT_NAME).is_file():
        return path / WEIGHT_NAME
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) != 1:
        raise NotFound(f"{path}: no {WEIGHT_NAME} and {len(candidates)} other .safetensors files "
                       "(name the file)")
    return candidates[0]


def _read_diffusers_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None, Path]:
    file = _lora_file(Path(path))
    with safe_open(file, framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        raw = (f.metadata() or {}).get(METADATA_KEY)
    metadata = json.loads(raw) if raw else None
    if state and all(k.startswith(f"{PREFIX}.") for k in state):  # pipeline format (save_lora_weights)
        state = {k[len(PREFIX) + 1:]: v for k, v in state.items()}
        if metadata is not None:
            metadata = {k[len(PREFIX) + 1:]: v for k, v in metadata.items() if k.startswith(f"{PREFIX}.")}
    else:
        other = next((k for k in state if k.split(".")[0] in ("text_encoder", "unet")), None)
        if other is not None:
            raise BadInput(f"{file}: key {other!r} is not a CogVideoX transformer adapter "
                           "(only transformer LoRA is supported)")
    return state, metadata, file


def _alpha(metadata: dict | None, rank: int, file: Path) -> float:
    if not metadata or "lora_alpha" not in metadata:
        log.warning("%s has no lora_alpha in its %s; using alpha = rank = %d as diffusers does", file,
                    METADATA_KEY, rank)
        return float(rank)
    if metadata.get("use_dora"):
        raise BadInput(f"{file}: use_dora=true (DoRA) adapters are not supported by vdm's LoRA")
    alpha = float(metadata["lora_alpha"])
    pattern = set((metadata.get("alpha_pattern") or {}).values())
    if pattern and pattern != {alpha}:
        raise BadInput(f"{file}: alpha_pattern gives modules alphas {sorted(pattern)} besides lora_alpha={alpha}; "
                       "vdm's add_lora uses one alpha for all modules")
    if metadata.get("use_rslora"):  # scale alpha/sqrt(r) equals plain LoRA's alpha'/r with alpha' = alpha·sqrt(r)
        alpha *= math.sqrt(rank)
    return alpha


def from_diffusers_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int, float]:
    """A diffusers LoRA file (or the folder holding `pytorch_lora_weights.safetensors`) ->
    (state in vdm/peft names, rank, alpha)."""
    state, metadata, file = _read_diffusers_file(path)
    modules = _parse(state, _DIFFUSERS_KEY, "transformer.<module>.lora_A.weight")
    rank = _uniform_rank(modules)
    alpha = _alpha(metadata, rank, file)
    vdm_state = {f"{module}.{kind}.{ADAPTER}.weight": tensor
                 for module, pair in sorted(modules.items()) for kind, tensor in sorted(pair.items())}
    return vdm_state, rank, alpha


def _check_modules(network: nn.Module, state: dict[str, torch.Tensor], rank: int, source: str) -> list[str]:
    """Every adapter's module exists, is a Linear, and fits its shapes; returns the module paths."""
    own = dict(network.named_modules())
    modules = []
    for key, tensor in state.items():
        match = _VDM_KEY.match(key)
        module = own.get(match["module"])
        if module is None:
            raise BadInput(f"{source}: key {key!r} names module {match['module']!r}, which the network does not have")
        if not isinstance(module, nn.Linear):
            raise BadInput(f"{source}: key {key!r} names {match['module']!r}, a {type(module).__name__}, "
                           "not a Linear layer")
        expected = (rank, module.in_features) if match["kind"] == "lora_A" else (module.out_features, rank)
        if tuple(tensor.shape) != expected:
            raise BadInput(f"{source}: key {key!r} has shape {tuple(tensor.shape)} but the network expects "
                           f"{expected}")
        modules.append(match["module"])
    return sorted(set(modules))


def _targets(network: nn.Module, modules: list[str]) -> list[str]:
    """Short names (`to_q`, ...) when they select exactly these modules, else the full module paths."""
    short = target_names(modules)
    hits = {name for name, _ in network.named_modules() if any(name == t or name.endswith("." + t) for t in short)}
    return short if hits == set(modules) else modules


def load_diffusers_lora(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Inject adapters (rank, alpha and targets from the file) into `network` and load them, strictly:
    every key in the file is used and every injected adapter weight is loaded."""
    if lora_state_dict(network):
        raise BadInput("the network already has LoRA adapters; load a diffusers LoRA into a network without them")
    state, rank, alpha = from_diffusers_lora(path)
    modules = _check_modules(network, state, rank, str(path))
    add_lora(network, rank=rank, alpha=alpha, target_modules=_targets(network, modules))
    own = lora_state_dict(network)
    missing = sorted(set(own) - set(state))
    if missing:
        raise BadInput(f"{path}: the network got adapter weight {missing[0]!r} that the file does not have "
                       f"({len(missing)} missing in all)")
    incompatible = network.load_state_dict(state, strict=False)
    if incompatible.unexpected_keys:
        raise BadInput(f"{path}: key {incompatible.unexpected_keys[0]!r} was not used")
    log.info("loaded a diffusers LoRA (%d modules, rank %d, alpha %g) from %s", len(modules), rank, alpha, path)
    return network


def import_lora(lora: str | os.PathLike, out: Path) -> None:
    """The `import` command: a diffusers LoRA -> a vdm adapter state dict, as a LoRA run's model.safetensors."""
    if out.suffix != ".safetensors":
        raise BadInput(f"out={out}: name a .safetensors file")
    state, rank, alpha = from_diffusers_lora(lora)
    targets = target_names(_VDM_KEY.match(k)["module"] for k in state)
    _write_atomic({k: v.contiguous() for k, v in state.items()}, out,
                  {"format": "pt", "lora.rank": str(rank), "lora.alpha": repr(alpha),
                   "lora.target_modules": json.dumps(targets)})
    log.info("wrote %d adapter tensors to %s; a vdm LoRA run with these weights uses lora.rank=%d "
             "lora.alpha=%g lora.target_modules=[%s]", len(state), out, rank, alpha, ",".join(targets))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vdm.networks.lora_interop", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="vdm LoRA checkpoint -> diffusers pytorch_lora_weights.safetensors")
    export.add_argument("checkpoint", help="<run>/checkpoints/step-N (rank and alpha from <run>/config.yaml)")
    export.add_argument("out", help="output folder (or a .safetensors file name)")
    export.add_argument("--ema", action="store_true", help="export the EMA adapter weights (ema.safetensors)")
    export.add_argument("--rank", type=int, help="needed only without <run>/config.yaml")
    export.add_argument("--alpha", type=float, help="needed only without <run>/config.yaml")
    imp = commands.add_parser("import", help="diffusers LoRA -> vdm adapter state dict (.safetensors)")
    imp.add_argument("lora", help="a diffusers LoRA .safetensors, or the folder holding " + WEIGHT_NAME)
    imp.add_argument("out", help="output .safetensors (vdm/peft key names)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "export":
            save_diffusers_lora(args.checkpoint, args.out, rank=args.rank, alpha=args.alpha, ema=args.ema)
        else:
            import_lora(args.lora, Path(args.out))
    except UserError as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
