"""The reference's (DiTCtrl) case files as vdm sampling options.

A case file is YAML with its options under `args:`, as the reference's `inference_case_configs/*.yaml`,
or the same keys at the top level (vdm's form; a `prompts:` list alone is the .yaml prompts_file).
`read_case_file` checks every key and maps it onto conf/sample.yaml's names; `apply_case_file` lays the
result over a composed config. Precedence: command line > file > the reference's own defaults (for `args:`
files only, see `REFERENCE_DEFAULTS`) > sample.yaml.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from vdm.errors import BadInput, NotFound

# The reference's AdaLN mixin names -> vdm's attention controls (vdm.networks.controls.CONTROLS).
ADALN = {
    "BaseAdaLNMixin": "base",
    "KVSharingAdaLNMixin": "kv_sharing",
    "KVSharingMaskGuidedAdaLNMixin": "kv_sharing_mask_guided",
    "ReWeightAdaLNMixin": "reweight",
    "VisualizeAdaLNMixin": "visualize",
}

# Keys that only steer the reference's own runtime (SAT loading, precision, its batch): accepted, not used.
RUNTIME_KEYS = ("load", "mode", "batch_size", "fp16", "force_inference", "latent_channels")

# The reference runs every case merged over its configs/inference.yaml (run_*.sh pass it as --base;
# arguments.py process_config_to_args). Its sampling values that differ from what sample.yaml's defaults
# mean; the window (start/end step and layer) is left out: vdm's defaults give the same window.
REFERENCE_DEFAULTS = {"seed": 42, "fps": 16, "control": ["kv_sharing"]}
REFERENCE_LAYOUT = {"overlap_size": 9, "num_transition_blocks": 2, "longer_mid_segment": 0}  # multi-prompt
REFERENCE_MASK_GUIDED = {"control_options.thres": 0.3, "control_options.ref_token_idx": [0],
                         "control_options.cur_token_idx": [0]}


class _Invalid(Exception):
    """A value of the wrong kind; the message says what would be valid."""


def _int(minimum: int | None = 0) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise _Invalid("an integer" if minimum is None else f"an integer >= {minimum}")
        return value
    return check


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid("a number")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("a non-empty string")
    return value


def _optional_dir(value: Any) -> str | None:
    if not isinstance(value, str):
        raise _Invalid('a folder path ("" for none)')
    return value or None


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _indices(value: Any) -> list[int]:
    """Step or layer indices: a list (a single index is a one-item list)."""
    values = [value] if _is_index(value) else value
    if not isinstance(values, list) or not all(_is_index(v) for v in values):
        raise _Invalid("a list of integers >= 0")
    return values


def _token_idx(value: Any) -> int | list[int]:
    if not (_is_index(value) or (isinstance(value, list) and value and all(_is_index(v) for v in value))):
        raise _Invalid("a text token index or a non-empty list of them (integers >= 0)")
    return value


def _prompts(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(p, str) and p.strip() for p in value):
        raise _Invalid("a non-empty list of non-empty strings (one video; several prompts: a multi-prompt video)")
    return [p.strip() for p in value]


def _adaln(value: Any) -> list[str]:
    names = [value] if isinstance(value, str) else value
    valid = ", ".join([*ADALN, *ADALN.values()])
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _Invalid(f"a non-empty list of names from {valid}")
    unknown = [n for n in names if n not in ADALN and n not in ADALN.values()]
    if unknown:
        raise _Invalid(f"a list of names from {valid} ({unknown[0]!r} is unknown)")
    return [ADALN.get(n, n) for n in names]


# Reference key -> (sample.yaml dotted key, check); a check's None states nothing. is_edit (and
# ReWeightAdaLNMixin in adaln_mixin_names) become `mode`.
KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "prompts": ("prompts", _prompts),
    "seed": ("seed", _int(None)),
    "output_dir": ("output_dir", _text),
    "sampling_fps": ("fps", _int(1)),
    "sampling_num_frames": ("tile_size", _int(1)),  # latent frames per segment (13 for CogVideoX)
    "overlap_size": ("overlap_size", _int()),
    "num_transition_blocks": ("num_transition_blocks", _int()),
    "longer_mid_segment": ("longer_mid_segment", _int()),
    "is_edit": ("is_edit", _bool),
    "is_run_isolated": ("is_run_isolated", _bool),
    "single_prompt_length": ("single_prompt_length", _int()),
    "adaln_mixin_names": ("control", _adaln),
    "start_step": ("control_options.start_step", _int()),
    "end_step": ("control_options.end_step", _int()),
    "start_layer": ("control_options.start_layer", _int()),
    "end_layer": ("control_options.end_layer", _int()),
    "step_idx": ("control_options.step_idx", _indices),
    "layer_idx": ("control_options.layer_idx", _indices),
    "thres": ("control_options.thres", _number),
    "ref_token_idx": ("control_options.ref_token_idx", _token_idx),
    "cur_token_idx": ("control_options.cur_token_idx", _token_idx),
    "mask_save_dir": ("control_options.save_masks_dir", _optional_dir),
    "reweight_token_idx": ("reweight_token_idx", _token_idx),
    "reweight_scale": ("reweight_scale", _number),
    "attn_map_step_idx": ("attn_map_step_idx", _indices),
    "attn_map_layer_idx": ("attn_map_layer_idx", _indices),
}
VALID_KEYS = ", ".join([*KEYS, *RUNTIME_KEYS])


@dataclass(frozen=True)
class CaseFile:
    """One case file read: `options` are what the file states, as sample.yaml dotted keys; `inherited` are
    the reference's defaults for what an `args:` file leaves out (empty for flat files); `ignored` are the
    file's reference-runtime keys (RUNTIME_KEYS), for the caller to report."""

    path: Path
    options: dict[str, Any]
    inherited: dict[str, Any]
    ignored: tuple[str, ...]


def is_case_file(path: str | Path) -> bool:
    """A .yaml / .yml file is read as a case file (a .txt prompts file is not)."""
    return Path(path).suffix.lower() in (".yaml", ".yml")


def _load(path: Path) -> tuple[dict, str]:
    """The file's options and the prefix that names them in messages ("args." or "")."""
    if not path.is_file():
        raise NotFound(f"case file {path}: no such file")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise BadInput(f"case file {path} is not readable YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise BadInput(f"case file {path} must hold a mapping (`args:` with the options, or the options)")
    if "args" not in data:
        return data, ""
    extra = [k for k in data if k != "args"]
    if extra:
        raise BadInput(f"case file {path}: top-level key {extra[0]!r} beside `args:`; a case file holds only `args:`")
    if not isinstance(data["args"], dict):
        raise BadInput(f"case file {path}: `args:` must be a mapping of options ({VALID_KEYS})")
    return data["args"], "args."


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _inherited(options: dict[str, Any]) -> dict[str, Any]:
    defaults = dict(REFERENCE_DEFAULTS)
    several = len(options["prompts"]) > 1 or options.get("single_prompt_length", 0) > 1
    if options.get("mode", "sample") == "sample" and several:
        defaults.update(REFERENCE_LAYOUT)
    if "kv_sharing_mask_guided" in options.get("control", defaults["control"]):
        defaults.update(REFERENCE_MASK_GUIDED)
    return {k: v for k, v in defaults.items() if k not in options}


def read_case_file(path: str | Path) -> CaseFile:
    """Read and check one case file; every refusal is a one-line ValueError naming the file and the key.
    A key whose value is null states nothing (as if left out)."""
    path = Path(path)
    args, prefix = _load(path)
    options: dict[str, Any] = {}
    for key, value in args.items():
        if key in RUNTIME_KEYS or value is None:
            continue
        if key not in KEYS:
            raise BadInput(f"case file {path}: unknown key {prefix}{key}; valid keys: {VALID_KEYS}")
        target, check = KEYS[key]
        try:
            value = check(value)
        except _Invalid as err:
            raise BadInput(f"case file {path}: {prefix}{key}={_short(value)}; valid: {err}") from None
        if value is not None:
            options[target] = value
    if "prompts" not in options:
        raise BadInput(f"case file {path} has no prompts; give {prefix}prompts: a list of prompts (one video)")
    if options.get("single_prompt_length", 0) > 0 and len(options["prompts"]) != 1:
        raise BadInput(f"case file {path}: {prefix}single_prompt_length repeats one prompt; "
                       f"the file gives {len(options['prompts'])}")
    is_edit = options.pop("is_edit", False)
    adaln = options.get("control", [])
    if "reweight" in adaln:  # the reference runs reweight cases as [source, target] pairs, like edits
        if set(adaln) != {"reweight"}:
            raise BadInput(f"case file {path}: {prefix}adaln_mixin_names mixes ReWeightAdaLNMixin with "
                           "other controls; reweight runs on its own (mode=reweight), give it alone")
        options["mode"] = "reweight"
    elif is_edit:
        options["mode"] = "edit"
    ignored = tuple(k for k in args if k in RUNTIME_KEYS)
    return CaseFile(path, options, _inherited(options) if prefix else {}, ignored)


def _given(key: str, explicit: Iterable[str]) -> bool:
    return any(key == e or key.startswith(e + ".") for e in explicit)


def apply_case_file(cfg: DictConfig, case: CaseFile, explicit: Iterable[str] = ()) -> DictConfig:
    """A copy of `cfg` with the case's options (over its inherited reference defaults) set, except the
    dotted keys in `explicit` (those the command line gave; "control_options" covers every control_options.*
    key, and `adaln` stands for `control`).
    Keys missing from `cfg` are added."""
    explicit = set(explicit) | ({"control"} if "adaln" in explicit else set())
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in {**case.inherited, **case.options}.items():
            if _given(key, explicit):
                continue
            if key.startswith("control_options.") and out.get("control_options") is None:
                out.control_options = {}
            OmegaConf.update(out, key, value, merge=False)
    return out


def explicit_keys(overrides: Iterable[str]) -> set[str]:
    """The dotted keys of Hydra command-line overrides: `seed=1`, `+control_options.thres=0.2`, `~fps` ->
    {"seed", "control_options.thres", "fps"} (inside sample.py: HydraConfig.get().overrides.task)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}
