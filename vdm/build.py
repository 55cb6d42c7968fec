"""The one place where a composed Hydra config becomes objects: `build_engine(cfg)`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from vdm.engine import VideoDiffusionEngine, network_in_channels
from vdm.errors import BadInput
from vdm.networks.diffusers_io import read_safetensors
from vdm.networks.lora import add_lora
from vdm.pretrained import read_folder, variant_of

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def instantiate(config, **kwargs):
    """`hydra.utils.instantiate`, but a component's own ValueError / FileNotFoundError (already one line
    naming the key or file) reaches the caller unwrapped instead of inside Hydra's multi-line report."""
    try:
        return hydra_instantiate(config, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, FileNotFoundError, FileExistsError)):
            raise err.__cause__ from None
        raise


def crossattn_dim(conditioner) -> int:
    """Width of the conditioner's `crossattn` output (embedders sharing the key are concatenated)."""
    dims = [e.output_dim for e in conditioner.embedders if e.output_key == "crossattn"]
    if not dims:
        raise BadInput("the conditioner has no embedder with output_key 'crossattn'; the DiT needs text context")
    return sum(dims)


def build_network(network_cfg: DictConfig, latent_channels: int, text_dim: int, lr_scale: int | None,
                  weights: dict | None = None, weights_source: str = "network weights",
                  dtype: torch.dtype | None = None, image_to_video: bool = False):
    """Instantiate the network, deriving channel and text widths the config leaves out and checking
    the ones it states against the first stage and conditioner. With `weights` (a full state dict) the
    network is built on the meta device and takes the weights' storage (no random init of a 5B model),
    then becomes `dtype` (float32 by default)."""
    derived = {"in_channels": network_in_channels(latent_channels, lr_scale, image_to_video),
               "out_channels": latent_channels,
               "text_embed_dim": text_dim}
    stated = OmegaConf.to_container(network_cfg, resolve=True)
    for key, value in derived.items():
        if stated.get(key) is None:
            stated[key] = value
        elif stated[key] != value:
            source = "the conditioner's text width" if key == "text_embed_dim" else "the first stage's latent channels"
            raise BadInput(f"network.{key}={stated[key]} does not match {source} ({value}); "
                           f"remove network.{key} to derive it, or change the other group")
    if weights is None:
        return instantiate(stated).to(dtype or torch.float32)
    with torch.device("meta"):
        network = instantiate(stated)
    network.load_checked_state_dict(weights, source=weights_source, assign=True)
    return network.to(dtype or torch.float32)


def build_engine(cfg: DictConfig, network_weights: dict | None = None,
                 weights_source: str = "network weights", network_dtype: torch.dtype | None = None
                 ) -> VideoDiffusionEngine:
    """Compose the engine from the config groups (network, denoiser, sampler, conditioner, first_stage, loss).

    `network_weights` (a full DiT state dict) load before LoRA adapters are added, so base weights
    keep their plain names; the network is float32 unless `network_dtype` says otherwise.
    """
    VideoDiffusionEngine.check_options(lr_scale=cfg.lr_scale,
                                       en_and_decode_n_samples_a_time=cfg.en_and_decode_n_samples_a_time)
    if network_weights is None and cfg.get("pretrained"):
        network_weights, weights_source = pretrained_transformer(cfg.pretrained)
    first_stage = instantiate(cfg.first_stage.model)
    conditioner = instantiate(cfg.conditioner)
    network = build_network(cfg.network, first_stage.latent_channels, crossattn_dim(conditioner), cfg.lr_scale,
                            network_weights, weights_source, network_dtype, cfg.get("image_to_video", False))
    if cfg.lora_train:
        add_lora(network, **OmegaConf.to_container(cfg.lora, resolve=True))
    return VideoDiffusionEngine(
        network=network,
        denoiser=instantiate(cfg.denoiser),
        conditioner=conditioner,
        first_stage=first_stage,
        loss_fn=instantiate(cfg.loss),
        sampler_single=instantiate(cfg.sampler),
        sampler_ddim=instantiate(cfg.sampler_ddim),
        sampler_multi_prompt=instantiate(cfg.get("sampler_multi_prompt")),
        input_key=cfg.input_key,
        log_keys=cfg.log_keys,
        scale_factor=cfg.first_stage.scale_factor,
        latent_input=cfg.latent_input,
        no_cond_log=cfg.no_cond_log,
        compile_model=cfg.compile_model,
        en_and_decode_n_samples_a_time=cfg.en_and_decode_n_samples_a_time,
        lr_scale=cfg.lr_scale,
        image_to_video=cfg.get("image_to_video", False),
        image_latent_scale=cfg.get("image_latent_scale", "scale"),
        image_dropout=cfg.get("image_dropout", 0.0),
        lora_train=cfg.lora_train,
        use_pd=cfg.use_pd,
        not_trainable_prefixes=list(cfg.not_trainable_prefixes),
    )


def pretrained_transformer(pretrained: str | Path) -> tuple[dict, str]:
    """The transformer weights of a diffusers-format CogVideoX folder (checked), and where they came from."""
    folder = read_folder(pretrained, components=("transformer",)).root / "transformer"
    return read_safetensors(folder), str(folder)


def config_variant(cfg: DictConfig) -> str:
    """Which released CogVideoX model a composed config describes (the names of `CogVideoXFolder.variant`)."""
    return variant_of(cfg.network, bool(cfg.get("image_to_video")))


def check_trainable(pretrained: str | Path, cfg: DictConfig) -> Path:
    """A CogVideoX folder the composed training config can start from (its preset describes the same model);
    the folder's root."""
    checked = read_folder(pretrained, components=("transformer",))
    described = config_variant(cfg)
    if checked.variant != described:
        raise BadInput(f"pretrained={checked.root} is {checked.variant} but the config describes {described}: "
                       f"train it with experiment={checked.variant}_lora or experiment={checked.variant}_sft "
                       f"(or experiment={checked.variant})")
    return checked.root


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the project config outside a Hydra app (tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (train.py, sample.py): its search path is conf/
        return hydra_compose(config_name=config_name, overrides=overrides or [])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])
