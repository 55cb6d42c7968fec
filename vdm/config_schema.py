"""Typed top-level keys of conf/train.yaml and conf/sample.yaml, checked before Hydra creates anything.

`TrainConfig` and `SampleConfig` give each top-level key its type: a Python type, a `Literal` of choices, a
`path(...)` (a non-empty string) or a union of them; a nested dataclass types a plain mapping whose keys are
fixed (scheduler, ema, checkpoint, lora); `dict` is a config group or a `_target_` node, whose contents
belong to its own code. The keys a yaml file defines are valid even before the schema types them (so a key
added to the yaml works at once; tests/test_config_schema.py then asks for its type).

`validate(cfg, "train")` walks a composed config and raises `ConfigError`, one line naming the key, the
value and what is valid. `check_command_line("train", argv)` composes the command line's config the way
Hydra will (each job of a `-m` sweep) and validates it, so train.py and sample.py refuse a misspelt key or a
wrong value before Hydra makes a run folder. What the check does not recognise (Hydra's own flags, an
unknown group option, override syntax) it leaves for Hydra to report.
"""

import argparse
import dataclasses
import difflib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vdm.build import CONF_DIR, compose
from vdm.errors import UserError


class ConfigError(UserError, ValueError):
    """A key or value the schema refuses; the message is one line naming the key and what is valid."""


@dataclass(frozen=True)
class Matching:
    """Annotates `str`: the value must fully match `pattern`; `valid` describes it in messages."""

    pattern: str
    valid: str


def path(what: str) -> Any:
    """A non-empty string naming a file or folder (existence is checked where it is used)."""
    return Annotated[str, Matching(r"(?s).*\S.*", what)]


Device = Annotated[str, Matching(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda, cuda:<index>")]


@dataclass(frozen=True)
class Scheduler:
    warmup_steps: int
    decay: Literal["cosine", "linear", "constant"]
    min_lr_ratio: float


@dataclass(frozen=True)
class EMA:
    enabled: bool
    decay: float


@dataclass(frozen=True)
class Checkpointing:
    every: int | None
    keep: int | None


@dataclass(frozen=True)
class LoRA:
    rank: int
    alpha: float
    target_modules: list[str]
    dropout: float


@dataclass(frozen=True)
class Control:
    """conf/sample.yaml's `control_options:` block: the attention controls' options (vdm/networks/controls.py)."""

    start_step: int | None
    end_step: int | None
    start_layer: int | None
    end_layer: int | None
    step_idx: list[int] | None
    layer_idx: list[int] | None
    ref_token_idx: int | list[int] | None
    cur_token_idx: int | list[int] | None
    thres: float | None
    save_masks_dir: path("a folder") | None
    share_kv_steps: int | None
    out_dir: path("a folder") | None
    token_idx: int | list[int] | None
    frame_idx: int | list[int] | None
    positions: list[list[int]] | None


@dataclass(frozen=True)
class Inversion:
    """conf/sample.yaml's `inversion:` block: editing a video (mode=edit|reweight video=<mp4>)."""

    cfg: float | None
    iterations: int
    source_cfg: float | None
    target_cfg: float | None


@dataclass(frozen=True)
class TrainConfig:
    """conf/train.yaml over conf/config.yaml."""

    # conf/train.yaml
    run_name: str | int  # Hydra reads run_name=7 as an integer
    runs_root: path("a folder")
    seed: int
    max_steps: int
    batch_size: int
    grad_accum_steps: int
    mixed_precision: Literal["no", "bf16", "fp16"]
    clip_grad_norm: float | None
    nan_tolerance: int
    fsdp: bool
    num_workers: int
    optim: dict
    scheduler: Scheduler
    ema: EMA
    log_every: int
    video_every: int
    video_samples: int
    video_num_steps: int
    video_latent_frames: int | None
    video_offload: bool
    checkpoint: Checkpointing
    resume: Literal["auto"] | path("a run or checkpoint folder") | None
    init_from: path("a run or checkpoint folder or a .safetensors file") | None
    pd: dict  # conf/pd/: progressive distillation, checked by vdm.training.distill
    # conf/config.yaml: its groups, then the engine's options
    network: dict
    discretization: dict
    denoiser: dict
    guider: dict
    sampler: dict
    conditioner: dict
    first_stage: dict
    loss: dict
    data: dict
    sampler_ddim: dict
    sampler_multi_prompt: dict
    pretrained: path("a CogVideoX folder") | None
    input_key: str
    log_keys: list[str]
    latent_input: bool
    no_cond_log: bool
    compile_model: bool
    en_and_decode_n_samples_a_time: int | None
    lr_scale: int | None
    image_to_video: bool
    image_latent_scale: Literal["scale", "invert", "none"]
    image_dropout: float
    use_pd: bool
    not_trainable_prefixes: list[str]
    lora_train: bool
    lora: LoRA


@dataclass(frozen=True)
class SampleConfig:
    """conf/sample.yaml."""

    pretrained: path("a CogVideoX folder") | None
    checkpoint: path("a run or checkpoint folder") | None
    lora: path("a diffusers LoRA .safetensors or its folder") | None
    runs_root: path("a folder")
    use_ema: bool
    mode: Literal["sample", "edit", "reweight"]
    prompts: str | list[str] | None
    prompts_file: path("a .txt or .yaml file") | None
    num_samples: int
    seed: int
    sampler: dict
    guider: dict | None
    cache: dict | None  # conf/cache/: checked by vdm.networks.caches.make_cache
    steps: int
    cfg: float | None
    rescale: Literal["subset", "full"] | None
    dtype: Literal["bf16", "fp16", "fp32"] | None
    batch_size: int
    compile_model: bool
    tile_size: int | None
    overlap_size: int | None
    num_transition_blocks: int | None
    longer_mid_segment: int | None
    reuse: bool | None
    single_prompt_length: int
    is_run_isolated: bool
    control: str | list[str]
    adaln: str | list[str] | None
    control_options: Control
    attn_map_step_idx: list[int]
    attn_map_layer_idx: list[int]
    reweight_token_idx: int | list[int] | None
    reweight_scale: float
    num_frames: int | None
    height: int | None
    width: int | None
    lr_video: path("an .mp4 file") | None
    image: path("a .png or .jpg file") | None
    image_latent_scale: Literal["scale", "invert", "none"] | None
    text_length: int | None
    video: path("an .mp4 file") | None
    strength: float
    inversion: Inversion
    output_dir: path("a folder") | None
    resume: bool
    save_latents: bool
    video_format: Literal["both", "lossless"]
    fps: float | None
    device: Device
    cfg_parallel: bool
    ulysses: int
    offload: bool


SCHEMAS = {"train": TrainConfig, "sample": SampleConfig}
# Option groups that moved: (file, old parent key) -> the new one (`control.*` became `control_options.*` when
# `control=` took over naming the controls from `adaln=`).
MOVED = {("sample.yaml", "control"): "control_options"}


# --- what a type accepts and how messages name it -------------------------------------------------------

def _members(tp: Any) -> tuple:
    return get_args(tp) if get_origin(tp) in (Union, UnionType) else (tp,)


def _matches(value: Any, tp: Any) -> bool:
    if get_origin(tp) in (Union, UnionType):
        return any(_matches(value, member) for member in get_args(tp))
    if get_origin(tp) is Literal:
        return isinstance(value, str) and value in get_args(tp)
    if get_origin(tp) is Annotated:
        base, rule = get_args(tp)
        return _matches(value, base) and re.fullmatch(rule.pattern, value) is not None
    if get_origin(tp) is list:
        return isinstance(value, list) and all(_matches(v, get_args(tp)[0]) for v in value)
    if tp is NoneType:
        return value is None
    if tp is dict:
        return isinstance(value, DictConfig)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


_NAMES = {NoneType: "null", bool: "true, false", int: "an integer", float: "a number", str: "a string",
          dict: "a mapping"}
_PLURALS = {int: "integers", float: "numbers", str: "strings"}


def describe(tp: Any) -> str:
    """What `tp` accepts, as messages say it: `no, bf16, fp16`; `an integer, null`."""
    words = []
    for member in _members(tp):
        if get_origin(member) is Literal:
            words += get_args(member)
        elif get_origin(member) is Annotated:
            words.append(get_args(member)[1].valid)
        elif get_origin(member) is list:
            words.append(f"a list of {_PLURALS[get_args(member)[0]]}")
        else:
            words.append(_NAMES[member])
    return ", ".join(words)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def _unknown(key: str, valid: Iterable[str], where: str, hint: str = "") -> str:
    parent, _, leaf = key.rpartition(".")
    valid = sorted(valid)
    close = difflib.get_close_matches(leaf, valid, n=1)
    guess = f"did you mean '{parent + '.' if parent else ''}{close[0]}'? " if close else ""
    scope = f"valid under {parent}" if parent else "valid"
    return f"unknown key '{key}' in {where}; {guess}{scope}: {', '.join(valid) or '(none)'}{hint}"


def _keys(node: Any) -> set[str]:
    return {str(k) for k in node.keys()} if isinstance(node, DictConfig) else set()


# --- a composed config ---------------------------------------------------------------------------------

def validate(cfg: DictConfig, config_name: str, defaults: DictConfig | None = None) -> None:
    """Raise `ConfigError` at the first key of `cfg` that neither `config_name`'s schema nor its yaml knows,
    or whose value the schema refuses. `defaults`: the config composed without overrides (composed here
    when not given), whose keys are valid even where the schema has no type for them yet."""
    if defaults is None:
        defaults = compose([], config_name)
    _check_mapping(cfg, SCHEMAS[config_name], defaults, f"{config_name}.yaml", prefix="")


def _check_mapping(node: DictConfig, schema: type, defaults: Any, where: str, prefix: str) -> None:
    types = get_type_hints(schema, include_extras=True)
    valid = set(types) | _keys(defaults)
    for key in map(str, node.keys()):
        full = prefix + key
        if key not in valid:
            raise ConfigError(_unknown(full, valid, where))
        if key not in types:
            continue  # in the yaml, not yet typed
        tp = types[key]
        try:
            value = node[key]
            if isinstance(value, ListConfig):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{full} in {where}: {str(err).splitlines()[0]}") from None
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, DictConfig):
                fields = ", ".join(f.name for f in dataclasses.fields(tp))
                raise ConfigError(f"{full}={_show(value)} in {where}; valid: a mapping of {fields}")
            child_defaults = defaults.get(key) if isinstance(defaults, DictConfig) else None
            _check_mapping(value, tp, child_defaults, where, prefix=full + ".")
        elif not _matches(value, tp):
            raise ConfigError(f"{full}={_show(value)} in {where}; valid: {describe(tp)}")


# --- the command line, before Hydra runs -----------------------------------------------------------------

def check_command_line(config_name: str, argv: list[str]) -> None:
    """Validate the config that `python <entry point>.py *argv` would run, before Hydra creates any folder;
    raise `ConfigError` for an unknown key or a wrong value. With `-m`, every job of the sweep is checked."""
    if "--version" in argv:
        return
    parser = get_args_parser()  # Hydra's own
    parser.exit_on_error = False
    try:
        args, extra = parser.parse_known_args(argv)
    except argparse.ArgumentError:
        return
    not_a_run = (args.help, args.hydra_help, args.info, args.shell_completion, args.experimental_rerun,
                 args.config_path, args.config_name, args.config_dir)  # another config: Hydra's checks alone
    if extra or any(flag not in (None, False) for flag in not_a_run):
        return
    overrides = OverridesParser.create()
    try:
        parsed = overrides.parse_overrides(args.overrides)
        if args.multirun:
            jobs = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
        elif any(o.is_sweep_override() for o in parsed):
            return  # Hydra explains that a sweep needs -m
        else:
            jobs = [args.overrides]
        jobs = [[o for o in overrides.parse_overrides(job) if not _is_hydra(o)] for job in jobs]
    except HydraException:
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        groups = set(GlobalHydra.instance().config_loader().list_groups(""))
        defaults = compose([], config_name)
        for job in jobs:
            _check_job(config_name, job, groups, defaults)


def _is_hydra(override: Override) -> bool:
    return override.key_or_group == "hydra" or override.key_or_group.startswith(("hydra.", "hydra/"))


def _check_job(config_name: str, job: list[Override], groups: set[str], defaults: DictConfig) -> None:
    try:
        cfg = compose([o.input_line for o in job], config_name)
    except (HydraException, OmegaConfBaseException, ValueError):  # ValueError: a list's item set by a name
        # Hydra refused an override: name the key if it is one the config does not have
        is_group = [(o.key_or_group in groups or "/" in o.key_or_group) and not isinstance(o.value(), dict)
                    for o in job]
        try:
            base = compose([o.input_line for o, group in zip(job, is_group) if group], config_name)
        except (HydraException, OmegaConfBaseException):
            return  # an unknown group option: Hydra's own message lists the options
        for override, group in zip(job, is_group):
            if not group:
                _check_override_key(override, base, SCHEMAS[config_name], f"{config_name}.yaml")
        return
    validate(cfg, config_name, defaults)


def _check_override_key(override: Override, base: DictConfig, schema: type, where: str) -> None:
    """Walk `override`'s dotted key down `base` (the config with the command line's group choices)."""
    node, tp = base, schema
    parts = override.key_or_group.split(".")
    moved = MOVED.get((where, parts[0])) if len(parts) > 1 else None
    if moved:
        raise ConfigError(f"{override.key_or_group} in {where}: {moved}.{'.'.join(parts[1:])} is its name now "
                          f"({parts[0]}= takes a value of its own)")
    for depth, part in enumerate(parts):
        if tp is dict and (override.is_add() or override.is_force_add()):
            return  # +key adds to a group or a `_target_` node: its own code judges it
        types = get_type_hints(tp, include_extras=True) if dataclasses.is_dataclass(tp) else {}
        valid = _keys(node) | set(types)
        if part not in valid:
            key = ".".join(parts[: depth + 1])
            adds = tp is dict and not override.is_delete()
            hint = f" (+{override.input_line.lstrip('+')} adds a new key)" if adds else ""
            raise ConfigError(_unknown(key, valid, where, hint))
        if part not in _keys(node):
            return  # a group not chosen on this command line: Hydra says so
        try:
            node = node[part]
        except (OmegaConfBaseException, ValueError):  # ValueError: a list indexed by a name
            return
        tp = types.get(part, dict)
        tp = tp if dataclasses.is_dataclass(tp) else dict  # below a group or `_target_` node: any keys
        if not isinstance(node, DictConfig):
            return
