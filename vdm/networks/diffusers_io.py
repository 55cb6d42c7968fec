"""diffusers-format folders: loading and saving a CogVideoX transformer (`load_transformer`, `save_transformer`,
behind `DiffusionTransformer.from_pretrained` / `save_pretrained`), its config, (sharded) safetensors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vdm.atomic import umask_mode
from vdm.errors import AlreadyExists, BadInput, NotFound

log = logging.getLogger(__name__)

DIFFUSERS_CLASS = "CogVideoXTransformer3DModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


# diffusers config keys that change the architecture in ways this network does not implement.
_UNSUPPORTED = {"activation_fn": "gelu-approximate", "timestep_activation_fn": "silu"}


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
            raise BadInput(f"{config_file}: {key}={raw[key]!r} is not supported (only {supported!r}, as every "
                           "released CogVideoX has)")
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


def load_transformer(cls, config_cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                     **overrides):
    """A `cls` (the DiffusionTransformer) from a diffusers-format CogVideoX transformer folder (config.json +
    safetensors, sharded or not), built on the meta device and filled with strict, one-line checks.

    `path` may also be a pipeline folder holding `transformer/`. `overrides` replace config values that do not
    change parameter shapes (e.g. `gradient_checkpointing=True`)."""
    folder = find_transformer_folder(Path(path))
    hparams = hparams_from_diffusers_config(folder / "config.json", config_cls, cls.__name__)
    checkpointing = overrides.pop("gradient_checkpointing", False)
    hparams.update(overrides)
    with torch.device("meta"):
        model = cls(gradient_checkpointing=checkpointing, **hparams)
    model.load_checked_state_dict(read_safetensors(folder), source=str(folder), assign=True)
    if torch_dtype is not None:
        model.to(torch_dtype)
    log.info("loaded %s (%.1fM parameters) from %s", cls.__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, folder)
    return model


def save_transformer(model, path: str | os.PathLike, max_shard_size: int | None = None,
                     overwrite: bool = False) -> Path:
    """Write `model` as a diffusers-loadable folder atomically (temp folder, then rename).

    Refuses to replace an existing folder unless `overwrite`, and a network with a vdm-only option
    (`head_hidden_dim`, `vector_dim`: diffusers would misread the folder). `max_shard_size` (bytes) shards the
    weights with a diffusers index file."""
    path = Path(path)
    check_diffusers_exportable(model.config, f"a folder of it ({path})")
    if path.exists() and not overwrite:
        raise AlreadyExists(f"{path} already exists; pass overwrite=True or choose a new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(umask_mode(directory=True))  # mkdtemp's folder is private
    try:
        config = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": "0.30.0", **asdict(model.config)}
        for extra in VDM_ONLY:  # unused (checked above): the folder is diffusers' own
            del config[extra]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        write_safetensors(state, tmp, max_shard_size)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
