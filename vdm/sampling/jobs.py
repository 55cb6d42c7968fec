"""What a sampling job makes: the videos (each a list of prompts) read from `prompts` or a prompts file,
and one `Job` per video, attention control and sample, planned and checked before anything loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from vdm.networks.controls import CONTROLS

USAGE = "e.g. prompts='[\"a red square moving right\"]' or prompts_file=prompts.txt"
MODES = ("sample", "edit", "reweight")


@dataclass
class Job:
    prompts: list[str]
    control: str  # attention control name ("base" for single-prompt videos)
    seed: int
    name: str


def _check_prompt_list(prompts, where: str) -> list[str]:
    if not isinstance(prompts, (list, ListConfig)) or not prompts or not all(
            isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{where} must be a non-empty list of non-empty strings ({USAGE})")
    return [p.strip() for p in prompts]


def read_prompts(cfg: DictConfig) -> list[list[str]]:
    """The videos to make, each a list of prompts (several: one multi-prompt video)."""
    if (cfg.prompts is None) == (cfg.prompts_file is None):
        raise ValueError(f"give exactly one of prompts or prompts_file ({USAGE})")
    if cfg.prompts is not None:
        return [_check_prompt_list([cfg.prompts] if isinstance(cfg.prompts, str) else cfg.prompts, "prompts")]
    path = Path(cfg.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompts_file={path}: no such file")
    if path.suffix in (".yaml", ".yml"):  # the reference's case-file form: one multi-prompt video
        data = OmegaConf.load(path)
        if not isinstance(data, DictConfig) or "prompts" not in data:
            raise ValueError(f"prompts_file={path} must hold a `prompts:` list")
        return [_check_prompt_list(data.prompts, f"{path}: prompts")]
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompts_file={path} holds no prompt (one video per line; ' | ' separates prompts)")
    return [_check_prompt_list([p for p in line.split(" | ")], f"{path}: line {line!r}") for line in lines]


def control_options(cfg: DictConfig, name: str) -> dict:
    options = OmegaConf.to_container(cfg.control, resolve=True) if name != "base" else {}
    if name in ("reweight", "ReWeightAdaLNMixin"):
        if cfg.reweight_token_idx is None:
            raise ValueError("the reweight control needs reweight_token_idx=<text token index> (and reweight_scale)")
        options.update(reweight_token_idx=cfg.reweight_token_idx, reweight_scale=cfg.reweight_scale)
    return options


def plan_jobs(cfg: DictConfig, videos: list[list[str]]) -> list[Job]:
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r}; valid: {', '.join(MODES)}")
    adaln = [cfg.adaln] if isinstance(cfg.adaln, str) else list(cfg.adaln)
    unknown = [a for a in adaln if a not in CONTROLS]
    if not adaln or unknown:
        raise ValueError(f"adaln={adaln}: valid controls are {', '.join(CONTROLS)}")
    if cfg.mode == "edit" and any(len(v) != 2 for v in videos):
        raise ValueError("mode=edit takes exactly two prompts per video: prompts='[source, target]'")
    if cfg.mode == "reweight":
        videos = [v * 2 if len(v) == 1 else v for v in videos]
        if any(len(v) != 2 for v in videos):
            raise ValueError("mode=reweight takes one prompt (or [source, target]) per video")
        adaln = ["reweight"]
    layout_given = [k for k in ("num_transition_blocks", "longer_mid_segment") if cfg[k]]
    if cfg.mode == "sample" and layout_given and any(len(v) == 1 for v in videos):
        raise ValueError(f"{layout_given[0]}={cfg[layout_given[0]]} needs at least two prompts per video; "
                         "a single-prompt video takes no transition options")
    jobs = []
    for v, prompts in enumerate(videos):
        controls = adaln if (len(prompts) > 1 or cfg.mode != "sample") else ["base"]
        for control in controls:  # the same seeds for every control: a side-by-side comparison
            for k in range(cfg.num_samples):
                jobs.append(Job(prompts, control, cfg.seed + v * cfg.num_samples + k, f"sample_{len(jobs):04d}"))
    return jobs


def check_tokens(options: dict, length: int) -> None:
    """A control's token options against the text length, before anything is sampled."""
    for key in ("ref_token_idx", "cur_token_idx", "reweight_token_idx"):
        values = options.get(key)
        values = [values] if isinstance(values, int) else (values or [])
        bad = [v for v in values if not 0 <= int(v) < length]
        if bad:
            raise ValueError(f"{key}={bad[0]} is beyond the text length {length} (valid 0..{length - 1})")
