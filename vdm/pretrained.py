"""Released CogVideoX folders (diffusers layout): what a folder holds, checked, and the engine config it implies.

A CogVideoX 1.0 text-to-video folder as published (CogVideoX-2b, CogVideoX-5b):

    model_index.json                 _class_name CogVideoXPipeline
    transformer/config.json          CogVideoXTransformer3DModel (+ diffusion_pytorch_model*.safetensors)
    vae/config.json                  AutoencoderKLCogVideoX, with its own scaling_factor (2B 1.15258426, 5B 0.7)
    text_encoder/, tokenizer/        T5-XXL; the tokenizer is spiece.model + tokenizer_config.json
    scheduler/scheduler_config.json  CogVideoXDDIMScheduler or CogVideoXDPMScheduler: v-prediction, zero
                                     terminal SNR, snr_shift_scale (2B 3.0, 5B 1.0)

The family's other folders differ in what their files say: CogVideoX-5B-I2V names
CogVideoXImageToVideoPipeline and its transformer takes 32 channels (the noisy latent and the image latent)
with a learned position table; CogVideoX1.5-5B has `patch_size_t: 2` and its VAE `invert_scale_latents: true`;
CogVideoX1.5-5B-I2V both, plus `ofs_embed_dim`.

`read_folder` checks the parts a task needs and refuses anything else (another model, an architecture the
network does not implement) with one line naming the file; `engine_config` turns a checked folder into the
composed engine config (`experiment=cogvideox_2b|5b` with every value the folder states).
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
I2V_PIPELINE = "CogVideoXImageToVideoPipeline"
PIPELINES = (PIPELINE, I2V_PIPELINE)
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
    image_to_video: bool = False  # model_index.json names CogVideoXImageToVideoPipeline
    invert_scale_latents: bool = False  # vae/config.json (1.5): the image latent is divided by scaling_factor

    @property
    def preset(self) -> str:
        """The preset the folder's transformer matches: 5B (and every later model) uses 3D RoPE, 2B sin-cos."""
        return "cogvideox_5b" if self.transformer.get("use_rotary_positional_embeddings") else "cogvideox_2b"

    @property
    def variant(self) -> str:
        return variant_of(self.transformer, self.image_to_video)


def variant_of(transformer, image_to_video: bool) -> str:
    """Which released model transformer hyper-parameters (diffusers' names) describe: cogvideox_2b, cogvideox_5b,
    cogvideox_5b_i2v, cogvideox15_5b or cogvideox15_5b_i2v."""
    base = ("cogvideox15_5b" if transformer.get("patch_size_t") else
            "cogvideox_5b" if transformer.get("use_rotary_positional_embeddings") else "cogvideox_2b")
    return base + ("_i2v" if image_to_video else "")


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
    image_to_video = False
    if index.is_file():
        name = _json(index).get("_class_name")
        if name not in PIPELINES:
            raise BadInput(f"pretrained={root}: model_index.json names {name!r}: not a {' or '.join(PIPELINES)} "
                           "folder")
        image_to_video = name == I2V_PIPELINE
    elif not (root / "transformer" / "config.json").is_file():
        raise BadInput(f"pretrained={root} is not a CogVideoX folder: it has no model_index.json and no "
                       "transformer/config.json")
    # refuses another class, CogVideoX 1.5 and any architecture the network does not implement
    transformer = hparams_from_diffusers_config(_component(root, "transformer", "config.json"), DiTConfig,
                                                DiffusionTransformer.__name__)
    scaling_factor, schedule, invert = None, {}, False
    if "vae" in components:
        vae = _json(_component(root, "vae", "config.json"))
        if vae.get("_class_name") != VAE_CLASS:
            raise BadInput(f"{root / 'vae' / 'config.json'}: _class_name is {vae.get('_class_name')!r}, "
                           f"not {VAE_CLASS!r}")
        scaling_factor = float(vae.get("scaling_factor", 1.15258426))
        invert = bool(vae.get("invert_scale_latents", False))
        latent = int(vae.get("latent_channels", 16))
        expected = 2 * latent if image_to_video else latent
        if transformer.get("in_channels", 16) != expected:
            kind = "an image-to-video" if image_to_video else "a text-to-video"
            raise BadInput(f"{root / 'transformer' / 'config.json'}: in_channels={transformer.get('in_channels', 16)}"
                           f", but {kind} model over the VAE's {latent} latent channels takes {expected}"
                           f"{' (the noisy latent and the image latent)' if image_to_video else ''}")
    if "text_encoder" in components:
        _component(root, "text_encoder", "config.json")
    if "tokenizer" in components and not any((root / "tokenizer" / f).is_file() for f in TOKENIZER_FILES):
        raise NotFound(f"pretrained={root}: missing component tokenizer/ (it needs "
                       f"{' or '.join(TOKENIZER_FILES)})")
    if "scheduler" in components:
        schedule = _read_scheduler(_component(root, "scheduler", "scheduler_config.json"))
    return CogVideoXFolder(root, transformer, scaling_factor, schedule, image_to_video, invert)


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

    cfg = compose([f"experiment={folder.preset}"])
    OmegaConf.set_struct(cfg, False)  # the folder states keys the preset leaves at their defaults
    cfg.pretrained = str(folder.root)
    cfg.network = OmegaConf.merge(cfg.network, folder.transformer)
    for embedder in cfg.conditioner.embedders:
        embedder.max_length = folder.transformer.get("max_text_seq_length", 226)
    if folder.scaling_factor is not None:
        cfg.first_stage.scale_factor = folder.scaling_factor
    cfg.image_to_video = folder.image_to_video
    cfg.image_latent_scale = "invert" if folder.invert_scale_latents else "scale"
    if folder.schedule:
        cfg.discretization = OmegaConf.merge(cfg.discretization, folder.schedule)
        cfg.denoiser.num_idx = cfg.loss.timestep_sampler.num_idx = folder.schedule["num_timesteps"]
    return cfg
