"""Released CogVideoX folders (diffusers layout): what a folder holds, checked, and the engine config it implies.

A CogVideoX 1.0 text-to-video folder as published (CogVideoX-2b, CogVideoX-5b):

    model_index.json                 _class_name CogVideoXPipeline
    transformer/config.json          CogVideoXTransformer3DModel (+ diffusion_pytorch_model*.safetensors)
    vae/config.json                  AutoencoderKLCogVideoX, with its own scaling_factor (2B 1.15258426, 5B 0.7)
    text_encoder/, tokenizer/        T5-XXL; the tokenizer is spiece.model + tokenizer_config.json
    scheduler/scheduler_config.json  CogVideoXDDIMScheduler or CogVideoXDPMScheduler: v-prediction, zero
                                     terminal SNR, snr_shift_scale (2B 3.0, 5B 1.0)

`read_folder` checks the parts a task needs and refuses anything else (CogVideoX 1.5, image-to-video,
another model) with one line naming the file; `engine_config` turns a checked folder into the composed
engine config (`experiment=cogvideox_2b|5b` with every value the folder states).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vdm.errors import BadInput, NotFound
from vdm.networks.diffusers_io import hparams_from_diffusers_config
from vdm.networks.dit import DiffusionTransformer, DiTConfig

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE = "CogVideoXPipeline"
SCHEDULERS = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
VAE_CLASS = "AutoencoderKLCogVideoX"
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
# What the engine implements of a diffusers scheduler config: any other value is refused, not ignored.
SCHEDULER_REQUIRES = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                      "beta_schedule": "scaled_linear", "timestep_spacing": "trailing"}


@dataclass(frozen=True)
class CogVideoXFolder:
    root: Path
    transformer: dict  # DiffusionTransformer hyper-parameters from transformer/config.json
    scaling_factor: float | None = None  # vae/config.json
    schedule: dict = field(default_factory=dict)  # ZeroSNRDDPM arguments from scheduler/scheduler_config.json

    @property
    def variant(self) -> str:
        """The preset the folder's transformer matches: 5B uses 3D RoPE, 2B sin-cos positions."""
        return "cogvideox_5b" if self.transformer.get("use_rotary_positional_embeddings") else "cogvideox_2b"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadInput(f"{path}: not valid JSON ({err})") from None


def _component(root: Path, name: str, file: str) -> Path:
    path = root / name / file
    if not path.is_file():
        raise NotFound(f"pretrained={root}: missing component {name}/ ({path} not found; a CogVideoX "
                       f"folder holds {', '.join(c + '/' for c in COMPONENTS)})")
    return path


def read_folder(path: str | Path, components: tuple[str, ...] = COMPONENTS) -> CogVideoXFolder:
    """Check a CogVideoX folder: that it is one (1.0, text-to-video) and holds `components`."""
    root = Path(path)
    if not root.is_dir():
        raise NotFound(f"pretrained={root}: no such folder (expected a CogVideoX folder with "
                       f"model_index.json and {', '.join(c + '/' for c in COMPONENTS)})")
    index = root / "model_index.json"
    if index.is_file():
        name = _json(index).get("_class_name")
        if name != PIPELINE:
            what = ("an image-to-video folder; only text-to-video CogVideoX is supported"
                    if name == "CogVideoXImageToVideoPipeline" else f"not a {PIPELINE} folder")
            raise BadInput(f"pretrained={root}: model_index.json names {name!r}: {what}")
    elif not (root / "transformer" / "config.json").is_file():
        raise BadInput(f"pretrained={root} is not a CogVideoX folder: it has no model_index.json and no "
                       "transformer/config.json")
    # refuses another class, CogVideoX 1.5 and any architecture the network does not implement
    transformer = hparams_from_diffusers_config(_component(root, "transformer", "config.json"), DiTConfig,
                                                DiffusionTransformer.__name__)
    scaling_factor, schedule = None, {}
    if "vae" in components:
        vae = _json(_component(root, "vae", "config.json"))
        if vae.get("_class_name") != VAE_CLASS:
            raise BadInput(f"{root / 'vae' / 'config.json'}: _class_name is {vae.get('_class_name')!r}, "
                           f"not {VAE_CLASS!r}")
        scaling_factor = float(vae.get("scaling_factor", 1.15258426))
    if "text_encoder" in components:
        _component(root, "text_encoder", "config.json")
    if "tokenizer" in components and not any((root / "tokenizer" / f).is_file() for f in TOKENIZER_FILES):
        raise NotFound(f"pretrained={root}: missing component tokenizer/ (it needs "
                       f"{' or '.join(TOKENIZER_FILES)})")
    if "scheduler" in components:
        schedule = _read_scheduler(_component(root, "scheduler", "scheduler_config.json"))
    return CogVideoXFolder(root, transformer, scaling_factor, schedule)


def _read_scheduler(path: Path) -> dict:
    raw = _json(path)
    if raw.get("_class_name") not in SCHEDULERS:
        raise BadInput(f"{path}: _class_name is {raw.get('_class_name')!r}; expected one of {', '.join(SCHEDULERS)}")
    for key, value in SCHEDULER_REQUIRES.items():
        if raw.get(key, value) != value:
            raise BadInput(f"{path}: {key}={raw[key]!r} is not supported (CogVideoX uses {value!r})")
    return {"linear_start": float(raw.get("beta_start", 0.00085)), "linear_end": float(raw.get("beta_end", 0.012)),
            "num_timesteps": int(raw.get("num_train_timesteps", 1000)),
            "shift_scale": float(raw.get("snr_shift_scale", 3.0))}


def engine_config(folder: CogVideoXFolder) -> DictConfig:
    """The composed engine config for a checked folder: its variant's preset with the folder's own
    network, text length, VAE scaling factor and schedule."""
    from vdm.build import compose

    cfg = compose([f"experiment={folder.variant}"])
    OmegaConf.set_struct(cfg, False)  # the folder states keys the preset leaves at their defaults
    cfg.pretrained = str(folder.root)
    cfg.network = OmegaConf.merge(cfg.network, folder.transformer)
    for embedder in cfg.conditioner.embedders:
        embedder.max_length = folder.transformer.get("max_text_seq_length", 226)
    if folder.scaling_factor is not None:
        cfg.first_stage.scale_factor = folder.scaling_factor
    if folder.schedule:
        cfg.discretization = OmegaConf.merge(cfg.discretization, folder.schedule)
        cfg.denoiser.num_idx = cfg.loss.timestep_sampler.num_idx = folder.schedule["num_timesteps"]
    return cfg
