"""Run directories: the resolved config a run writes, and finding runs and checkpoints by intent
(`resume=auto`, `init_from=<run | checkpoint | file>`, "the latest run")."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vdm.training.checkpoint import MODEL, latest_checkpoint, list_checkpoints, read_state

RUN_CONFIG = "config.yaml"


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
        raise FileNotFoundError(f"{run_dir} is not a vdm run: it has no {RUN_CONFIG}")
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
            raise FileExistsError(f"{run_dir} already holds checkpoints; pass resume=auto to continue it, or "
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
        raise FileNotFoundError(f"{path}: no such run or checkpoint folder")
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} holds no complete checkpoint (expected checkpoints/step-<N>/ with "
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
            raise ValueError(f"init_from={init_from} is a LoRA run; base weights must come from a full run or file")
        return checkpoint / MODEL
    exclude = Path(exclude).resolve()
    full = [run for run in find_runs(Path(runs_root)) if run.resolve() != exclude
            and not read_state(latest_checkpoint(run)).lora]
    if not full:
        what = "lora_train=true needs base weights" if lora else "init_from is unset"
        raise FileNotFoundError(f"{what}: no full training run with a checkpoint under {runs_root}/; "
                                "train one first with `python train.py`, or pass init_from=<run dir, "
                                "checkpoint dir or .safetensors file>")
    return latest_checkpoint(full[-1]) / MODEL
