"""Tiny CogVideoX folders laid out exactly like the released ones (THUDM/CogVideoX-2b, -5b):

    model_index.json
    transformer/  config.json + diffusion_pytorch_model.safetensors (CogVideoXTransformer3DModel)
    vae/          config.json + safetensors (AutoencoderKLCogVideoX, with its scaling_factor)
    text_encoder/ config.json + safetensors (T5EncoderModel)
    tokenizer/    spiece.model + tokenizer_config.json, nothing else (a sentencepiece model trained here)
    scheduler/    scheduler_config.json (CogVideoXDDIMScheduler)

Every weight is random (the transformer's perturbed so that no zero-initialised layer hides a bug);
nothing is downloaded.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from tests.networks.test_dit_parity import CONFIGS, FAMILY, reference_model
from tests.tiny import TINY_VAE_CONFIG

# What tells the released folders apart, at tiny size: positions, VAE scaling, SNR shift (1.0 T2V), and the
# family's I2V pipeline, 1.5's 2-frame tokens and inverted image-latent scaling.
VARIANTS = {
    "2b": dict(transformer=CONFIGS["sincos_2b_like"], scaling_factor=1.15258426, snr_shift_scale=3.0),
    "5b": dict(transformer=CONFIGS["rope_5b_like"], scaling_factor=0.7, snr_shift_scale=1.0),
}
FAMILY_VARIANTS = {
    "5b_i2v": dict(transformer=FAMILY["i2v_5b_like"], scaling_factor=0.7, snr_shift_scale=1.0, i2v=True),
    "15_t2v": dict(transformer=FAMILY["t2v_15_like"], scaling_factor=0.7, snr_shift_scale=1.0, invert=True),
    "15_i2v": dict(transformer=FAMILY["i2v_15_like"], scaling_factor=0.7, snr_shift_scale=1.0, invert=True, i2v=True),
}
CORPUS = ["a red square moving right", "a blue circle moving up", "a panda playing guitar in a bamboo forest",
          "a green triangle drifting down", "an astronaut riding a horse on the moon", "waves crash on rocks"]
EXTRA_IDS = 100  # T5's sentinel tokens, appended by the tokenizer after the sentencepiece vocabulary


def model_index(i2v: bool = False) -> dict:
    return {"_class_name": "CogVideoXImageToVideoPipeline" if i2v else "CogVideoXPipeline",
            "_diffusers_version": "0.30.0.dev0",
            "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLCogVideoX"]}


def scheduler_config(snr_shift_scale: float) -> dict:
    return {"_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": "0.30.0.dev0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
            "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
            "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": snr_shift_scale,
            "steps_offset": 0, "timestep_spacing": "trailing", "trained_betas": None}


def write_tokenizer(folder: Path, max_length: int) -> int:
    """spiece.model (T5's special ids: pad 0, eos 1, unk 2) and tokenizer_config.json; returns the vocab size."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=48,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1)
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "additional_special_tokens": extra, "clean_up_tokenization_spaces": True, "eos_token": "</s>",
        "extra_ids": EXTRA_IDS, "legacy": True, "model_max_length": max_length, "pad_token": "<pad>",
        "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}, indent=2))
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size() + EXTRA_IDS


def make_cogvideox_folder(root: Path, variant: str = "2b", seed: int = 0, transformer: dict | None = None) -> Path:
    """`transformer` replaces the variant's tiny transformer config (the VAE's latent channels and the
    T5's width follow it)."""
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel

    spec = {**VARIANTS, **FAMILY_VARIANTS}[variant]
    config = transformer or spec["transformer"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(model_index(spec.get("i2v", False)), indent=2))
    reference_model(config, seed).save_pretrained(root / "transformer")
    torch.manual_seed(seed)
    AutoencoderKLCogVideoX(**{**TINY_VAE_CONFIG, "latent_channels": config["out_channels"]},
                           scaling_factor=spec["scaling_factor"],
                           invert_scale_latents=spec.get("invert", False)).save_pretrained(root / "vae")
    vocab = write_tokenizer(root / "tokenizer", config["max_text_seq_length"])
    T5EncoderModel(T5Config(vocab_size=vocab, d_model=config["text_embed_dim"], d_kv=8, d_ff=40, num_layers=2,
                            num_heads=2)).save_pretrained(root / "text_encoder")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config(spec["snr_shift_scale"]), indent=2))
    return root
