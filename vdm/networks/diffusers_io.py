"""diffusers-format folders: finding a CogVideoX transformer, reading its config, (sharded) safetensors."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vdm.errors import BadInput, NotFound

DIFFUSERS_CLASS = "CogVideoXTransformer3DModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


# diffusers config keys that change the architecture in ways this network does not implement.
_UNSUPPORTED = {"patch_size_t": None, "ofs_embed_dim": None, "activation_fn": "gelu-approximate",
                "timestep_activation_fn": "silu"}


# vdm-only network options (value when unused, what they add): diffusers' CogVideoXTransformer3DModel has no
# place for them and loads such a folder with the part missing or randomly initialised, warning at most.
VDM_ONLY = {"head_hidden_dim": (0, "a GELU output head, where diffusers has one linear proj_out"),
            "vector_dim": (None, "vector conditioning added to the time embedding")}


def check_diffusers_exportable(network, what: str) -> None:
    """Refuse, in one line naming the option, to write `what` for diffusers from a network (a DiTConfig or a
    run's `network` config) that uses a vdm-only option."""
    for option, (off, adds) in VDM_ONLY.items():
        value = getattr(network, option, off)
        if value != off:
            plain = " and ".join(f"{k}={'null' if v is None else v}" for k, (v, _) in VDM_ONLY.items())
            raise BadInput(f"network.{option}={value} ({adds}) has no counterpart in diffusers' {DIFFUSERS_CLASS}, "
                           f"which would misread {what}; only networks with {plain} export (vdm's own "
                           "checkpoints hold any network)")


def find_transformer_folder(path: Path) -> Path:
    if not path.is_dir():
        raise NotFound(f"{path}: no such folder (expected a CogVideoX transformer folder with config.json)")
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise BadInput(f"{path} is not a CogVideoX transformer folder: it has no config.json")
    return path


def hparams_from_diffusers_config(config_file: Path, config_cls, class_name: str) -> dict:
    """Constructor arguments from a diffusers config.json, refusing architectures we do not implement."""
    raw = json.loads(config_file.read_text())
    if raw.get("_class_name") not in (DIFFUSERS_CLASS, class_name):
        raise BadInput(f"{config_file}: _class_name is {raw.get('_class_name')!r}; expected {DIFFUSERS_CLASS!r}")
    for key, supported in _UNSUPPORTED.items():
        if raw.get(key, supported) != supported:
            raise BadInput(f"{config_file}: {key}={raw[key]!r} is not supported (only {supported!r}; "
                           "CogVideoX 1.5 checkpoints are not supported yet)")
    known = {f.name for f in fields(config_cls)}
    hparams = {k: v for k, v in raw.items() if k in known}
    if hparams.get("out_channels") is None:
        hparams["out_channels"] = hparams.get("in_channels", config_cls.in_channels)
    return hparams


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise NotFound(f"{folder / shard}: shard named in {index.name} is missing")
            state.update(load_file(folder / shard))
        return state
    for name in (WEIGHTS_NAME, "model.safetensors"):
        if (folder / name).is_file():
            return load_file(folder / name)
    raise NotFound(f"{folder}: no {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or model.safetensors")


def write_safetensors(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | None) -> None:
    if max_shard_size is None:
        save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": weight_map}, indent=2))
