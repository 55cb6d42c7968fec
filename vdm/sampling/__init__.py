"""Sampling: loading a model (a vdm run or a released CogVideoX folder), planning a job's videos, sampling
them and writing the files. `sample.py` is a thin Hydra edge over `sample(cfg)`."""

from vdm.sampling.load import (
    LoadedModel,
    latent_shape,
    load_model,
    load_pretrained,
    load_run,
    make_multi_prompt_sampler,
    make_sampler,
)
from vdm.sampling.run import sample, sample_latents, text_keys

__all__ = ["LoadedModel", "latent_shape", "load_model", "load_pretrained", "load_run", "make_multi_prompt_sampler",
           "make_sampler", "sample", "sample_latents", "text_keys"]
