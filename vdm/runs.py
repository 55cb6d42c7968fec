"""Run folders, as both training and sampling read them: the resolved config a run writes, its
checkpoints, and finding runs and checkpoints by intent (`resume=auto`, `init_from=<run | checkpoint |
file>`, "the latest run"). Writing checkpoints is `vdm.training.checkpoint`'s.

`<run>/config.yaml` is the resolved training config; `<run>/checkpoints/step-<N>/` holds:
  model.safetensors    the network's weights (a LoRA run: the adapter weights alone)
  ema.safetensors      the EMA of the same weights (when EMA is on)
  optimizer.pt         optimizer state (optimizer-<rank>.pt per rank when sharded, as under FSDP)
  scheduler.pt         learning-rate scheduler state
  rng-<rank>.pt        python / numpy / torch (/ cuda) RNG states of each process
  distill.json         a progressive-distillation student (use_pd=true): its round, DDIM step count and
                       guidance, which sampling uses by default
  state.json           step, data position, whether it is a LoRA checkpoint, skipped (non-finite) steps
                       and the number of processes (written last: it marks a complete checkpoint)
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from vdm.errors import AlreadyExists, BadInput, NotFound

RUN_CONFIG = "config.yaml"

STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL, EMA, OPTIMIZER, SCHEDULER, STATE = "model.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.pt", \
    "state.json"
DISTILL = "distill.json"


@dataclass
class Progress:
    """How far a run got (its checkpoints' state.json)."""

    step: int = 0  # training steps done, skipped ones included
    data_position: int = 0  # global samples drawn from the data stream
    lora: bool = False
    skipped_steps: int = 0  # steps whose loss or gradient norm was not finite: nothing was updated
    skips_in_a_row: int = 0  # of them, the latest consecutive ones

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, state.get(f.name, f.default))


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and
             (p / STATE).is_file()]
    return [p for _, p in sorted(steps)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> Progress:
    raw = json.loads((Path(checkpoint) / STATE).read_text())
    return Progress(step=raw["step"], data_position=raw["data_position"], lora=raw.get("lora", False),
                    skipped_steps=raw.get("skipped_steps", 0), skips_in_a_row=raw.get("skips_in_a_row", 0))


def read_distillation(checkpoint: Path) -> dict | None:
    """A distilled student's record (`student_steps`, `guidance`, ...), or None for any other checkpoint."""
    path = Path(checkpoint) / DISTILL
    return json.loads(path.read_text()) if path.is_file() else None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint folder (its model.safetensors) or a .safetensors file."""
    path = Path(path)
    file = path / MODEL if path.is_dir() else path
    if not file.is_file():
        raise NotFound(f"{file}: no such weights file (expected a checkpoint folder with {MODEL} "
                       "or a .safetensors file)")
    try:
        return load_file(file)
    except Exception as err:  # safetensors raises several types for a damaged file
        raise BadInput(f"{file}: not a readable safetensors file ({err})") from err


def write_run_config(cfg: DictConfig, run_dir: Path, init_from: Path | None = None) -> Path:
    """The run's resolved config (interpolations such as the run name fixed), plus the base weights used."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["init_from"] = None if init_from is None else str(Path(init_from).resolve())
    path = run_dir / RUN_CONFIG
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    return path


def read_run_config(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise NotFound(f"{run_dir} is not a vdm run: it has no {RUN_CONFIG}")
    return OmegaConf.load(path)


def find_runs(runs_root: Path) -> list[Path]:
    """Run folders under `runs_root` (multirun members included) that hold a checkpoint, newest last."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    found = [p.parent for p in root.rglob(RUN_CONFIG) if latest_checkpoint(p.parent) is not None]
    return sorted(found, key=lambda run: (latest_checkpoint(run) / "state.json").stat().st_mtime)


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`resume`: null (fresh; refuses a run folder that already holds checkpoints), `auto` (the latest
    checkpoint of this run folder, fresh if none), or a run / checkpoint folder."""
    if resume is None:
        if list_checkpoints(run_dir):
            raise AlreadyExists(f"{run_dir} already holds checkpoints; pass resume=auto to continue it, or "
                                "choose another run_name")
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    return checkpoint_of(resume)


def checkpoint_of(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    if not path.exists():
        raise NotFound(f"{path}: no such run or checkpoint folder")
    latest = latest_checkpoint(path)
    if latest is None:
        raise NotFound(f"{path} holds no complete checkpoint (expected checkpoints/step-<N>/ with "
                       "state.json)")
    return latest


def resolve_init_from(init_from: str | None, runs_root: str | Path, exclude: Path, lora: bool) -> Path:
    """Base weights: a `.safetensors` file, a checkpoint or run folder, or (for LoRA when unset) the
    latest full (non-LoRA) training run under `runs_root`."""
    if init_from is not None:
        path = Path(init_from)
        if path.is_file():
            return path
        checkpoint = checkpoint_of(path)
        if read_state(checkpoint).lora:
            raise BadInput(f"init_from={init_from} is a LoRA run; base weights must come from a full run or file")
        return checkpoint / MODEL
    exclude = Path(exclude).resolve()
    full = [run for run in find_runs(Path(runs_root)) if run.resolve() != exclude
            and not read_state(latest_checkpoint(run)).lora]
    if not full:
        what = "lora_train=true needs base weights" if lora else "init_from is unset"
        raise NotFound(f"{what}: no full training run with a checkpoint under {runs_root}/; "
                       "train one first with `python train.py`, or pass init_from=<run dir, "
                       "checkpoint dir or .safetensors file>")
    return latest_checkpoint(full[-1]) / MODEL
