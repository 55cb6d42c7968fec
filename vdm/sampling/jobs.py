"""What a sampling job makes: the videos (each a list of prompts) read from `prompts` or a prompts file,
and one `Job` per video, attention control and sample, planned and checked before anything loads."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from vdm.errors import BadInput, NotFound
from vdm.networks.attention_control import AttentionControl
from vdm.networks.controls import CONTROLS
from vdm.networks.kv_sharing import MaskGuidedKVSharing, default_step_window
from vdm.networks.reweight import Reweight
from vdm.networks.visualize import VisualizeAttention

USAGE = "e.g. prompts='[\"a red square moving right\"]' or prompts_file=prompts.txt"
MODES = ("sample", "edit", "reweight")
WINDOW_KEYS = {"start_step", "end_step", "start_layer", "end_layer", "step_idx", "layer_idx"}
# An edit of a video: K/V shared in the first 40% of the steps, in the layers from a quarter of the depth on. From
# inverted noise the reference's window (steps 2..25 of 50, its last layers) let edited shapes leave the input's
# path, more steps or layers kept the source's colour, every step copies the source (the default synthetic run,
# bench/inversion_edit.py, docs/editing.md).
INVERSION_WINDOW = (0.4, 0.25)


@dataclass
class Job:
    prompts: list[str]
    control: str  # attention control name ("base" for plain attention)
    seed: int
    name: str
    isolated: bool = False  # also each prompt's own video from its segment's noise (is_run_isolated)
    multi: bool = False  # one long multi-prompt video (several prompts, mode=sample)
    image: str | None = None  # image-to-video: this video's first frame (a .jsonl prompts file's "image")


def _check_prompt_list(prompts, where: str) -> list[str]:
    if not isinstance(prompts, (list, ListConfig)) or not prompts or not all(
            isinstance(p, str) and p.strip() for p in prompts):
        raise BadInput(f"{where} must be a non-empty list of non-empty strings ({USAGE})")
    return [p.strip() for p in prompts]


def read_prompts(cfg: DictConfig) -> list[list[str]]:
    """The videos to make, each a list of prompts (several: one multi-prompt video). A .yaml prompts_file
    is a case file, already turned into `prompts` by `vdm.sampling.case_file`; this reads text files."""
    if (cfg.prompts is None) == (cfg.prompts_file is None):
        raise BadInput(f"give exactly one of prompts or prompts_file ({USAGE})")
    if cfg.prompts is not None:
        return [_check_prompt_list([cfg.prompts] if isinstance(cfg.prompts, str) else cfg.prompts, "prompts")]
    path = Path(cfg.prompts_file)
    if not path.is_file():
        raise NotFound(f"prompts_file={path}: no such file")
    if path.suffix.lower() == ".jsonl":
        return [prompts for prompts, _ in read_jsonl(path)]
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise BadInput(f"prompts_file={path} holds no prompt (one video per line; ' | ' separates prompts)")
    return [_check_prompt_list([p for p in line.split(" | ")], f"{path}: line {line!r}") for line in lines]


def read_jsonl(path: Path) -> list[tuple[list[str], str | None]]:
    """A .jsonl prompts file: one video per line, `{"prompt": "..."}` or `{"prompts": [...]}`, and for an
    image-to-video model `"image": "<png|jpg>"` (relative paths from the file's folder). [(prompts, image)]."""
    import json

    videos = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadInput(f"prompts_file={path}: line {n} is not JSON ({err})") from None
        if not isinstance(entry, dict) or ("prompt" in entry) == ("prompts" in entry) or \
                set(entry) - {"prompt", "prompts", "image"}:
            raise BadInput(f"prompts_file={path}: line {n} must be an object with \"prompt\" (a string) or "
                           "\"prompts\" (a list), and optionally \"image\"")
        prompts = [entry["prompt"]] if "prompt" in entry else entry["prompts"]
        prompts = _check_prompt_list(prompts if isinstance(prompts, list) else None, f"{path}: line {n}")
        image = entry.get("image")
        if image is not None and not isinstance(image, str):
            raise BadInput(f"prompts_file={path}: line {n}: image must be a path string")
        videos.append((prompts, None if image is None else str(path.parent / image)))
    if not videos:
        raise BadInput(f"prompts_file={path} holds no video (one JSON object per line)")
    return videos


def video_images(cfg: DictConfig) -> list[str | None]:
    """Each video's image: a .jsonl prompts file's "image", else `image=` (for every video)."""
    if cfg.prompts_file is not None and Path(cfg.prompts_file).suffix.lower() == ".jsonl":
        return [image or cfg.get("image") for _, image in read_jsonl(Path(cfg.prompts_file))]
    return [cfg.get("image")] * len(read_prompts(cfg))


def control_option_names(name: str) -> set[str]:
    """The options the control registered as `name` takes (its constructor's arguments)."""
    return set(inspect.signature(CONTROLS[name].__init__).parameters) - {"self"}


def control_options(cfg: DictConfig, name: str, steps: int, out: Path | None = None,
                    job_name: str = "", num_layers: int | None = None) -> dict:
    """The options `name`'s control takes, from `control_options.*` and the top-level reweight / attention-map
    keys. `control_options.*` may hold options for several controls of one job: each takes the ones it knows.
    An edit of a video (`video=` with mode=edit) shares K/V by default in the first 40% of the steps and in every
    layer from a quarter of the network's `num_layers` depth on (`INVERSION_WINDOW`) rather than in the reference's
    window."""
    cls = CONTROLS[name]
    accepted = control_option_names(name)
    given = given_control_options(cfg)
    options = {k: v for k, v in given.items() if k in accepted}
    if cls is Reweight:
        if cfg.reweight_token_idx is None:
            raise BadInput("the reweight control needs reweight_token_idx=<text token index> (and reweight_scale)")
        options.update(reweight_token_idx=cfg.reweight_token_idx, reweight_scale=cfg.reweight_scale)
        if not WINDOW_KEYS & set(given):  # the reference's reweight cases act at every step and layer
            options.update(start_step=0, end_step=steps, start_layer=0)
    if cfg.get("video") and cfg.mode == "edit" and "start_step" in accepted and not WINDOW_KEYS & set(given):
        options.update(start_step=0, end_step=max(round(steps * INVERSION_WINDOW[0]), 1),
                       start_layer=round(INVERSION_WINDOW[1] * (num_layers or 0)))
    if "start_step" in accepted and "step_idx" not in options:  # the reference's 2..25 of 50, at this job's steps
        start, end = default_step_window(steps)
        options.setdefault("start_step", start)
        options.setdefault("end_step", end)
    if cls is VisualizeAttention:
        options.update(attn_map_step_idx=list(cfg.attn_map_step_idx), attn_map_layer_idx=list(cfg.attn_map_layer_idx))
        if out is not None and "out_dir" not in given:
            options["out_dir"] = str(out / "attn_map" / job_name)
    if options.get("save_masks_dir") and job_name:  # one folder per video: file names repeat across videos
        options["save_masks_dir"] = str(Path(options["save_masks_dir"]) / job_name)
    required = [n for n, p in inspect.signature(cls.__init__).parameters.items()
                if n != "self" and p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD and n not in options]
    if required:
        raise BadInput(f"the {name} control needs {' and '.join(f'control_options.{n}' for n in required)} "
                       "(e.g. control_options.ref_token_idx=[2] control_options.cur_token_idx=[2]: the text tokens "
                       "whose attention draws the masks)" if cls is MaskGuidedKVSharing else
                       f"the {name} control needs {' and '.join(f'control_options.{n}' for n in required)}")
    return options


def given_control_options(cfg: DictConfig) -> dict:
    """The `control_options.*` the job sets (null: the control's default)."""
    options = cfg.get("control_options")
    given = OmegaConf.to_container(options, resolve=True) if options is not None else {}
    return {k: v for k, v in given.items() if v is not None}


def check_control_keys(cfg: DictConfig, controls: set[str]) -> None:
    """Every `control_options.*` the job sets must be an option of at least one control the job uses."""
    given = set(given_control_options(cfg))
    known = set().union(*(control_option_names(c) for c in controls))
    unknown = sorted(given - known)
    if unknown:
        raise BadInput(f"control_options.{unknown[0]} is not an option of the job's controls ({', '.join(sorted(controls))});"
                       f" valid: {', '.join(sorted(known)) or 'none'}")


def expand_single_prompts(videos: list[list[str]], length: int) -> list[list[str]]:
    """single_prompt_length=N (N > 0): each one-prompt video becomes one long video of the prompt N times."""
    if length < 0:
        raise BadInput(f"single_prompt_length={length} must be >= 0 (0: off)")
    if not length:
        return videos
    if any(len(v) != 1 for v in videos):
        raise BadInput(f"single_prompt_length={length} repeats a single prompt; a video here has several")
    return [v * length for v in videos]


def job_controls(cfg: DictConfig) -> tuple[str, list[str]]:
    """(the key that named them, the control names): `adaln=` (the seed's name) when given, else `control=`."""
    key = "adaln" if cfg.get("adaln") is not None else "control"
    names = cfg[key]
    return key, [names] if isinstance(names, str) else list(names)


def plan_jobs(cfg: DictConfig, videos: list[list[str]]) -> list[Job]:
    if cfg.mode not in MODES:
        raise BadInput(f"mode={cfg.mode!r}; valid: {', '.join(MODES)}")
    key, adaln = job_controls(cfg)
    unknown = [a for a in adaln if a not in CONTROLS]
    if not adaln or unknown:
        raise BadInput(f"{key}={adaln}: valid controls are {', '.join(CONTROLS)}")
    images = video_images(cfg)
    videos = expand_single_prompts(videos, cfg.single_prompt_length)
    if cfg.mode == "edit" and any(len(v) != 2 for v in videos):
        raise BadInput("mode=edit takes exactly two prompts per video: prompts='[source, target]'")
    if cfg.mode == "reweight":
        videos = [v * 2 if len(v) == 1 else v for v in videos]
        if any(len(v) != 2 for v in videos):
            raise BadInput("mode=reweight takes one prompt (or [source, target]) per video")
        adaln = ["reweight"]
    layout_given = [k for k in ("num_transition_blocks", "longer_mid_segment") if cfg[k]]
    if cfg.mode == "sample" and layout_given and any(len(v) == 1 for v in videos):
        raise BadInput(f"{layout_given[0]}={cfg[layout_given[0]]} needs at least two prompts per video; "
                       "a single-prompt video takes no transition options")
    single = [a for a in adaln if CONTROLS[a] in (AttentionControl, VisualizeAttention)] or ["base"]
    jobs = []
    for v, prompts in enumerate(videos):
        multi = len(prompts) > 1 and cfg.mode == "sample"
        controls = adaln if (multi or cfg.mode != "sample") else single
        for c, control in enumerate(controls):  # the same seeds for every control: a side-by-side comparison
            for k in range(cfg.num_samples):
                isolated = bool(cfg.is_run_isolated) and multi and c == 0
                jobs.append(Job(prompts, control, cfg.seed + v * cfg.num_samples + k, f"sample_{len(jobs):04d}",
                                isolated, multi, images[v]))
    check_control_keys(cfg, {j.control for j in jobs})
    return jobs


def check_tokens(options: dict, length: int) -> None:
    """A control's token options against the text length, before anything is sampled."""
    for key in ("ref_token_idx", "cur_token_idx", "reweight_token_idx"):
        values = options.get(key)
        values = [values] if isinstance(values, int) else (values or [])
        bad = [v for v in values if not 0 <= int(v) < length]
        if bad:
            raise BadInput(f"{key}={bad[0]} is beyond the text length {length} (valid 0..{length - 1})")


@dataclass
class Unit:
    """One piece of work: a batch of single-prompt videos of one control, an edit / reweight pair, or a
    multi-prompt video, which every process samples together (`shared`). The batches depend on batch_size
    alone, never on the number of processes, so each video comes out the same however many there are."""

    jobs: list[Job]
    shared: bool = False

    @property
    def name(self) -> str:
        return self.jobs[0].name if len(self.jobs) == 1 else f"{self.jobs[0].name}-{self.jobs[-1].name}"


def plan_units(jobs: list[Job], mode: str, batch_size: int) -> list[Unit]:
    """Single-prompt videos batched per control (in job order), then the other jobs one by one."""
    single = [j for j in jobs if not j.multi and mode == "sample"]
    units = []
    for control in dict.fromkeys(j.control for j in single):
        group = [j for j in single if j.control == control]
        units += [Unit(group[i:i + batch_size]) for i in range(0, len(group), batch_size)]
    return units + [Unit([j], shared=mode == "sample") for j in jobs if j not in single]


def check_processes(units: list[Unit], world_size: int, batch_size: int) -> None:
    """More processes than work is refused: without a multi-prompt video (which every process shares),
    each process needs a unit of its own."""
    dealt = [u for u in units if not u.shared]
    if world_size > len(dealt) and not any(u.shared for u in units):
        videos = sum(len(u.jobs) for u in dealt)
        raise BadInput(f"{world_size} processes for {videos} videos in {len(dealt)} batches of batch_size="
                       f"{batch_size} (or edit pairs): launch at most {len(dealt)} processes"
                       + (f", or give batch_size={-(-videos // world_size)}" if videos >= world_size else ""))


def owners(units: list[Unit], world_size: int) -> list[int]:
    """The process that writes each unit's files: units that are not shared dealt round-robin (a process
    samples only its own), shared ones in turn (every process samples them, one decodes and writes)."""
    dealt = shared = 0
    out = []
    for unit in units:
        if unit.shared:
            out.append(shared % world_size)
            shared += 1
        else:
            out.append(dealt % world_size)
            dealt += 1
    return out
