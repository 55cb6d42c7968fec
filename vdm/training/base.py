"""The network weights a run starts from: a LoRA run's base, or `init_from` for a full run."""

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
    """
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
