"""The network weights a run starts from: a LoRA run's base, `init_from` for a full run, or a distillation
run's first teacher."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from vdm import runs

log = logging.getLogger(__name__)


def resolve_base_weights(cfg: DictConfig, run_dir: Path, resume_from: Path | None
                         ) -> tuple[dict[str, torch.Tensor] | None, Path | None]:
    """(weights, where they came from), or (None, None) when the network starts from its random init or from
    the `pretrained` folder, which `build_engine` reads itself.

    A LoRA run's base is `init_from` (default: the latest full run under `runs_root`), and a resumed LoRA run's
    the one the interrupted run recorded; a resumed full run takes its weights from the checkpoint instead.
    A distillation run (use_pd) always starts from its first teacher, resumed or not (`teacher_weights`).
    """
    if cfg.use_pd:
        return teacher_weights(cfg, run_dir, resume_from)
    source = None
    if cfg.lora_train and not cfg.get("pretrained"):
        if resume_from is not None:
            source = Path(runs.read_run_config(resume_from.parent.parent).init_from)
        else:
            source = runs.resolve_init_from(cfg.init_from, cfg.runs_root, exclude=run_dir, lora=True)
    elif not cfg.lora_train and cfg.init_from is not None and resume_from is None:
        source = runs.resolve_init_from(cfg.init_from, cfg.runs_root, exclude=run_dir, lora=False)
    if source is None:
        return None, None
    log.info("base weights from %s", source)
    return runs.load_weights(source), source


def teacher_weights(cfg: DictConfig, run_dir: Path, resume_from: Path | None
                    ) -> tuple[dict[str, torch.Tensor] | None, Path | None]:
    """The first teacher of a distillation run: `init_from` (a checkpoint's EMA weights when it has them and
    pd.teacher_ema, as sample.py samples it), or the one a resumed run recorded; (None, None) for the
    `pretrained` folder's transformer. Full and LoRA students alike start from it (LoRA: as their frozen base)."""
    if resume_from is not None:
        recorded = runs.read_run_config(resume_from.parent.parent).init_from
        source = None if recorded is None else Path(recorded)
    elif cfg.init_from is not None:
        source = runs.resolve_init_from(cfg.init_from, cfg.runs_root, exclude=run_dir, lora=cfg.lora_train)
        if source.name == runs.MODEL and cfg.pd.teacher_ema and (source.parent / runs.EMA).is_file():
            source = source.parent / runs.EMA
    else:
        source = None
    if source is None:
        return None, None
    log.info("teacher weights from %s", source)
    return {k: v for k, v in runs.load_weights(source).items() if not k.startswith("__")}, source
