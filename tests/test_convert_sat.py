"""SAT CogVideoX checkpoints -> vdm: tiny diffusers models are written in SAT's key layout (by an inverse
mapping written here, independently of the converter), converted back, and must compute the same outputs."""

import collections
import json
import os
import pickle
import random
import re
import shlex
import subprocess
import sys
import zipfile
from dataclasses import asdict

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

from tests.networks.test_dit_parity import reference_forward
from vdm.convert.sat import build_vae, convert_sat_transformer, convert_sat_vae, load_sat_checkpoint, main
from vdm.errors import BadInput
from vdm.networks import DiffusionTransformer

P = "model.diffusion_model."
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=24,
            text_embed_dim=20, num_layers=2, sample_width=8, sample_height=6, sample_frames=9,
            max_text_seq_length=7, patch_size=2)
CONFIGS = {
    "sincos_2b_like": dict(TINY),
    "rope_5b_like": dict(TINY, use_rotary_positional_embeddings=True, attention_head_dim=32),
    # 5B-I2V-like: RoPE, a learned [text | video] position table, image latents concatenated on channels.
    "rope_5b_i2v_like": dict(TINY, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
                             attention_head_dim=32, in_channels=8),
    # CogVideoX 1.5 (tests/networks/test_dit_parity.py's t2v_15_like / i2v_15_like): 2 latent frames per token
    # through a Linear patch embedding, sliced RoPE; 1.5-I2V adds the ofs embedding (time_embed_dim wide).
    "rope_15_5b_like": dict(TINY, use_rotary_positional_embeddings=True, attention_head_dim=32, patch_size_t=2,
                            patch_bias=False),
    "rope_15_5b_i2v_like": dict(TINY, use_rotary_positional_embeddings=True, attention_head_dim=32, patch_size_t=2,
                                patch_bias=False, in_channels=8, ofs_embed_dim=24),
}
SIZE_OPTIONS = ("sample_width", "sample_height", "sample_frames", "max_text_seq_length")
TINY_VAE = dict(block_out_channels=[8, 16, 16], down_block_types=["CogVideoXDownBlock3D"] * 3,
                up_block_types=["CogVideoXUpBlock3D"] * 3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                temporal_compression_ratio=4, sample_height=64, sample_width=64)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and stored buffer moved off its initial value, so no zero/one init hides a swapped key."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()


# -- the inverse mapping (diffusers / vdm names -> SAT) --------------------------------------------------------


def to_sat_transformer(state: dict, num_layers: int, extra: dict | None = None) -> dict:
    state = dict(state)
    sat = {}

    def move(ours: str, theirs: str):
        for kind in ("weight", "bias"):
            if f"{ours}.{kind}" in state:
                sat[P + f"{theirs}.{kind}"] = state.pop(f"{ours}.{kind}")

    for i in range(num_layers):
        b, layer = f"transformer_blocks.{i}.", f"transformer.layers.{i}."
        for kind in ("weight", "bias"):
            sat[P + layer + f"attention.query_key_value.{kind}"] = torch.cat(
                [state.pop(b + f"attn1.to_{x}.{kind}") for x in "qkv"])
            n1 = state.pop(b + f"norm1.linear.{kind}").chunk(6)  # video (shift, scale, gate), text (...)
            n2 = state.pop(b + f"norm2.linear.{kind}").chunk(6)
            sat[P + f"mixins.adaln_layer.adaLN_modulations.{i}.1.{kind}"] = torch.cat(n1[:3] + n2[:3] + n1[3:] + n2[3:])
        move(b + "attn1.to_out.0", layer + "attention.dense")
        move(b + "norm1.norm", layer + "input_layernorm")
        move(b + "norm2.norm", layer + "post_attention_layernorm")
        move(b + "ff.net.0.proj", layer + "mlp.dense_h_to_4h")
        move(b + "ff.net.2", layer + "mlp.dense_4h_to_h")
        move(b + "attn1.norm_q", f"mixins.adaln_layer.query_layernorm_list.{i}")
        move(b + "attn1.norm_k", f"mixins.adaln_layer.key_layernorm_list.{i}")
    for ours, theirs in [("patch_embed.proj", "mixins.patch_embed.proj"),
                         ("patch_embed.text_proj", "mixins.patch_embed.text_proj"),
                         ("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                         ("ofs_embedding.linear_1", "ofs_embed.0"), ("ofs_embedding.linear_2", "ofs_embed.2"),
                         ("vector_embedding.linear_1", "label_emb.0.0"), ("vector_embedding.linear_2", "label_emb.0.2"),
                         ("norm_final", "transformer.final_layernorm"), ("norm_out.norm", "mixins.final_layer.norm_final"),
                         ("norm_out.linear", "mixins.final_layer.adaLN_modulation.1"),
                         ("proj_out", "mixins.final_layer.linear")]:
        move(ours, theirs)
    if "patch_embed.pos_embedding" in state:
        sat[P + "mixins.pos_embed.pos_embedding"] = state.pop("patch_embed.pos_embedding")
    assert not state, f"inverse mapping left {sorted(state)}"
    return {**sat, **(extra or {})}


def to_sat_vae(state: dict, n_up: int) -> dict:
    sat = {}
    for key, value in state.items():
        key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
        key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
        key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
        key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_up - 1 - int(m[1])}.block.", key)
        key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_up - 1 - int(m[1])}.upsample.", key)
        sat[key.replace(".conv_shortcut.", ".nin_shortcut.")] = value
    return sat


# -- helpers ---------------------------------------------------------------------------------------------------


def inputs(config: dict, seed: int = 1):
    """Latents at the full sample size: 3 frames (9 pixel frames), which 1.5 (2 frames a token) pads to 4."""
    g = torch.Generator().manual_seed(seed)
    frames = 4 if config.get("patch_size_t") else 3
    x = torch.randn(2, frames, config["in_channels"], config["sample_height"], config["sample_width"], generator=g)
    context = torch.randn(2, config["max_text_seq_length"], config["text_embed_dim"], generator=g)
    return x, torch.tensor([17, 803]), context


def relative_error(ours, ref) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def sat_file(tmp_path, name: str, extra: dict | None = None):
    config = CONFIGS[name]
    ref = perturbed(CogVideoXTransformer3DModel(**config))
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": to_sat_transformer(ref.state_dict(), config["num_layers"], extra), "iteration": 1000}, path)
    return ref, path


def sizes(config: dict) -> dict:
    return {k: config[k] for k in SIZE_OPTIONS}


def deepspeed_save(path, module: dict, **client_state) -> None:
    """What SAT's training save (`save_ds_checkpoint`) writes: DeepSpeed's `_save_checkpoint` state (ZeRO-2, so no
    optimizer here), updated with SAT's client state, RNG states included."""
    state = dict(module=module, buffer_names=[], optimizer=None,
                 param_shapes=[collections.OrderedDict((k, v.shape) for k, v in module.items())],
                 frozen_param_shapes=None, shared_params={}, frozen_param_fragments=None, lr_scheduler=None,
                 data_sampler=None, random_ltd=None, sparse_tensor_module_names=set(), skipped_steps=3,
                 global_steps=1000, global_samples=8000, dp_world_size=8, mp_world_size=1,
                 ds_config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}, ds_version="0.14.4")
    state.update(iteration=1000,
                 client_lr_scheduler={"start_lr": 1e-4, "warmup_iter": 100, "num_iters": 1000, "decay_style": "linear"},
                 random_rng_state=random.getstate(), np_rng_state=np.random.get_state(),
                 torch_rng_state=torch.get_rng_state(), cuda_rng_state=torch.zeros(16, dtype=torch.uint8),
                 rng_tracker_states={"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)})
    state.update(client_state)
    torch.save(state, path)


def written_by_numpy_1(path) -> None:
    """Rewrite a torch file as numpy 1.x would have pickled its arrays: numpy 2 renamed numpy.core to numpy._core."""
    with zipfile.ZipFile(path) as src:
        records = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in records:
            if name.endswith("/data.pkl"):
                assert data.count(b"numpy._core.multiarray") == 1
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(name, data)


# -- transformer -----------------------------------------------------------------------------------------------

# (extra SAT tensors that are not network parameters, use_rotary argument) per config
SAT_EXTRAS = {
    # 2B stores its fixed sin-cos table; SAT's base model may keep an unused position embedding.
    "sincos_2b_like": ({P + "mixins.pos_embed.pos_embedding": torch.randn(1, 7 + 3 * 3 * 4, 32),
                        P + "transformer.position_embeddings.weight": torch.randn(64, 32)}, False),
    # RoPE tables, when stored, tell the converter it is a RoPE network (use_rotary=None); the engine's VAE
    # and text encoder may share the file.
    "rope_5b_like": ({P + "mixins.pos_embed.freqs_sin": torch.randn(3, 3, 4, 32),
                      P + "mixins.pos_embed.freqs_cos": torch.randn(3, 3, 4, 32),
                      "first_stage_model.encoder.conv_in.conv.weight": torch.randn(2, 3),
                      "conditioner.embedders.0.transformer.shared.weight": torch.randn(2, 3)}, None),
    "rope_5b_i2v_like": ({}, True),
    # 1.5's Linear patch embedding implies RoPE (no hidden-size lookup; its SAT code stores no RoPE tables), and its
    # base model may keep the unused position embedding.
    "rope_15_5b_like": ({P + "transformer.position_embeddings.weight": torch.randn(64, 64)}, None),
    "rope_15_5b_i2v_like": ({}, None),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformer_state_equals_diffusers(tmp_path, name):
    """Name for name and value for value, the converted state is the diffusers model's (which vdm's names follow)."""
    extra, use_rotary = SAT_EXTRAS[name]
    ref, path = sat_file(tmp_path, name, extra)
    state, _ = convert_sat_transformer(load_sat_checkpoint(path), use_rotary=use_rotary,
                                       network_config=sizes(CONFIGS[name]))
    expected = ref.state_dict()
    assert sorted(state) == sorted(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformer_matches_diffusers(tmp_path, name):
    extra, use_rotary = SAT_EXTRAS[name]
    ref, path = sat_file(tmp_path, name, extra)
    state, hparams = convert_sat_transformer(load_sat_checkpoint(path), use_rotary=use_rotary,
                                             network_config=sizes(CONFIGS[name]))
    for key, value in CONFIGS[name].items():
        assert hparams[key] == value, key  # every shape-determined option was read from the weights
    ours = DiffusionTransformer(**hparams)
    ours.load_checked_state_dict(state, source=str(path))
    x, t, context = inputs(CONFIGS[name])
    with torch.no_grad():
        assert relative_error(ours.eval()(x, t, context), reference_forward(ref, x, t, context)) < 1e-5


RELEASED = {
    "CogVideoX-2B": dict(num_layers=30, num_attention_heads=30),
    "CogVideoX-5B": dict(num_layers=42, num_attention_heads=48, use_rotary_positional_embeddings=True),
    "CogVideoX-5B-I2V": dict(num_layers=42, num_attention_heads=48, use_rotary_positional_embeddings=True,
                             use_learned_positional_embeddings=True, in_channels=32, out_channels=16),
    # diffusers' conversion with --version 1.5 (patch_size_t 2, patch_bias false, 300 x 300 latents, 81 frames)
    "CogVideoX1.5-5B": dict(num_layers=42, num_attention_heads=48, use_rotary_positional_embeddings=True,
                            patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81),
    "CogVideoX1.5-5B-I2V": dict(num_layers=42, num_attention_heads=48, use_rotary_positional_embeddings=True,
                                patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300,
                                sample_frames=81, in_channels=32, out_channels=16, ofs_embed_dim=512),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_sizes_infer_the_diffusers_config(name):
    """At the released sizes (meta tensors, no memory) nothing needs to be given: the config is diffusers'."""
    config = RELEASED[name]
    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**config)
        state, hparams = convert_sat_transformer(to_sat_transformer(ref.state_dict(), config["num_layers"]))
        ours = DiffusionTransformer(**hparams)
    ours_config = asdict(ours.config)
    assert {k: v for k, v in ref.config.items() if k in ours_config} == {k: ours_config[k] for k in ref.config
                                                                       if k in ours_config}
    assert sorted(state) == sorted(ref.state_dict())


@pytest.mark.parametrize("numpy_1", [False, True], ids=["numpy2_file", "numpy1_file"])
def test_deepspeed_training_save_with_rng_state_converts(tmp_path, numpy_1):
    """SAT's `mp_rank_00_model_states.pt` as its training writes it: the RNG states beside `module` (a numpy
    ndarray among them) are accepted, written by numpy 1.x or 2.x, and the weights convert as from a bare file."""
    extra, use_rotary = SAT_EXTRAS["sincos_2b_like"]
    ref = perturbed(CogVideoXTransformer3DModel(**CONFIGS["sincos_2b_like"]))
    path = tmp_path / "mp_rank_00_model_states.pt"
    deepspeed_save(path, to_sat_transformer(ref.state_dict(), TINY["num_layers"], extra))
    if numpy_1:
        written_by_numpy_1(path)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):  # plain weights_only refuses this file
        torch.load(path, weights_only=True)

    state, _ = convert_sat_transformer(load_sat_checkpoint(path), use_rotary=use_rotary, network_config=sizes(TINY))
    expected = ref.state_dict()
    assert sorted(state) == sorted(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_vector_embedding_round_trip(tmp_path):
    """SAT's `label_emb` (vector conditioning, not in diffusers) maps onto vdm's vector_embedding."""
    config = dict(TINY, vector_dim=6)
    ref = perturbed(DiffusionTransformer(**config))
    sat = to_sat_transformer(ref.state_dict(), config["num_layers"])
    assert P + "label_emb.0.0.weight" in sat
    state, hparams = convert_sat_transformer(sat, num_layers=2, use_rotary=False, network_config=sizes(config))
    assert hparams["vector_dim"] == 6
    ours = DiffusionTransformer(**hparams)
    ours.load_checked_state_dict(state, source="test")
    x, t, context = inputs(config)
    y = torch.randn(2, 6)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x, t, context, y=y), ref(x, t, context, y=y))


# -- VAE -------------------------------------------------------------------------------------------------------


def test_vae_matches_diffusers(tmp_path):
    torch.manual_seed(0)
    ref = perturbed(AutoencoderKLCogVideoX(**TINY_VAE))
    sat = to_sat_vae(ref.state_dict(), n_up=3)
    assert any(".nin_shortcut." in k for k in sat) and any(k.startswith("decoder.up.2.") for k in sat)
    sat["loss.discriminator.conv.weight"] = torch.randn(3, 3)  # training-only weights are dropped
    torch.save({"state_dict": sat}, tmp_path / "3d-vae.pt")

    state = convert_sat_vae(load_sat_checkpoint(tmp_path / "3d-vae.pt"))
    ours = build_vae(state, {"norm_num_groups": 4, "sample_height": 64, "sample_width": 64})
    assert list(ours.config["block_out_channels"]) == TINY_VAE["block_out_channels"]  # read from the weights
    assert (ours.config["latent_channels"], ours.config["layers_per_block"]) == (4, 1)
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours.decode(z).sample, ref.decode(z).sample)
        assert torch.equal(ours.encode(video).latent_dist.mode(), ref.encode(video).latent_dist.mode())


def test_vae_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown SAT VAE key 'encoder\.down\.0\.attn\.0\.q\.weight'"):
        convert_sat_vae({"encoder.conv_in.conv.weight": torch.zeros(1),
                         "encoder.down.0.attn.0.q.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unknown SAT VAE key 'quant_conv\.weight'"):
        convert_sat_vae({"quant_conv.weight": torch.zeros(1)})


# -- refusals and errors ---------------------------------------------------------------------------------------

EXECUTED = []


def _side_effect():
    EXECUTED.append(True)
    return {}


class RunsCode:
    def __reduce__(self):
        return (_side_effect, ())


class TaggedDict(collections.OrderedDict):
    pass


@pytest.mark.parametrize("payload", [lambda: {"module": RunsCode()}, lambda: {"module": TaggedDict(a=torch.ones(1))}],
                         ids=["reduce", "dict_subclass"])
def test_pickle_with_python_objects_is_refused(tmp_path, payload):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(payload(), path)
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states\.pt contains the Python global "
                                         r"tests\.test_convert_sat\.(_side_effect|TaggedDict), which vdm refuses to "
                                         r"execute: only tensors and numpy RNG state are accepted") as info:
        load_sat_checkpoint(path)
    assert "\n" not in str(info.value) and not EXECUTED


class RunsShell:
    """Unpickles by calling `func(command)`: with os.system, the command runs."""

    def __init__(self, func, command: str):
        self.func, self.command = func, command

    def __reduce__(self):
        return (self.func, (self.command,))


def rigged_training_save(tmp_path, func=os.system):
    """A training save with one forbidden global whose command, were it run, would create `hacked`."""
    marker = tmp_path / "hacked"
    command = f"touch {shlex.quote(str(marker))}"
    if func is eval:
        command = f"open({str(marker)!r}, 'w').close()"
    path = tmp_path / "mp_rank_00_model_states.pt"
    ref = CogVideoXTransformer3DModel(**TINY)
    deepspeed_save(path, to_sat_transformer(ref.state_dict(), TINY["num_layers"]), extra_state=RunsShell(func, command))
    return path, marker


def test_rigged_training_save_would_run_its_command(tmp_path):
    """The control for the refusals below: unpickled without the allowlist, the rigged file does run its command."""
    for func in (os.system, eval):
        path, marker = rigged_training_save(tmp_path, func)
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()


@pytest.mark.parametrize("func, name", [(os.system, f"{os.system.__module__}.system"), (eval, "eval")],
                         ids=["os_system", "builtins_eval"])
def test_training_save_with_a_forbidden_global_is_refused(tmp_path, func, name):
    path, marker = rigged_training_save(tmp_path, func)
    with pytest.raises(ValueError) as info:
        load_sat_checkpoint(path)
    assert str(info.value).startswith(f"{path} contains the Python global {name}, which vdm refuses to execute: "
                                      "only tensors and numpy RNG state are accepted")
    assert "\n" not in str(info.value) and not marker.exists()


@pytest.mark.parametrize("value, refused", [(np.zeros(3), type(np.dtype(np.float64))),  # numpy.dtypes.Float64DType
                                            (np.float64(1.0), np.float64(1.0).__reduce__()[0])],  # multiarray.scalar
                         ids=["float64_array", "numpy_scalar"])
def test_numpy_beyond_rng_state_is_refused(tmp_path, value, refused):
    """Only what `np.random.get_state()` needs is allowed: other numpy arrays and scalars are refused by name."""
    path = tmp_path / "mp_rank_00_model_states.pt"
    deepspeed_save(path, {"w": torch.ones(1)}, extra_state=value)
    name = f"{refused.__module__}.{refused.__qualname__}"
    with pytest.raises(ValueError, match=rf"contains the Python global {re.escape(name)}, which vdm refuses"):
        load_sat_checkpoint(path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt: no such file"):
        load_sat_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="text.pt is not a readable torch checkpoint"):
        load_sat_checkpoint(tmp_path / "text.pt")


def test_unknown_key_is_named(tmp_path):
    ref, path = sat_file(tmp_path, "sincos_2b_like", {P + "mixins.lora.matrix_A.0": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"unknown SAT key 'model\.diffusion_model\.mixins\.lora\.matrix_A\.0'"):
        convert_sat_transformer(load_sat_checkpoint(path), use_rotary=False)
    sat = load_sat_checkpoint(path)
    del sat[P + "mixins.lora.matrix_A.0"]
    sat["ema.something"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unknown SAT key 'ema\.something'"):
        convert_sat_transformer(sat, use_rotary=False)


def test_config_mismatches_name_the_key_and_both_shapes(tmp_path):
    _, path = sat_file(tmp_path, "sincos_2b_like")
    sat = load_sat_checkpoint(path)
    with pytest.raises(ValueError, match=r"'patch_embed\.text_proj\.weight' \(SAT 'model\.diffusion_model\.mixins\."
                                         r"patch_embed\.text_proj\.weight'\) has shape \(32, 20\) in the checkpoint "
                                         r"but \(32, 99\) in the network config"):
        convert_sat_transformer(sat, use_rotary=False, network_config={"text_embed_dim": 99})
    with pytest.raises(ValueError, match="num_layers=3 but the checkpoint has 2 layers"):
        convert_sat_transformer(sat, num_layers=3, use_rotary=False)
    with pytest.raises(ValueError, match="use_rotary=True contradicts network_config"):
        convert_sat_transformer(sat, use_rotary=True, network_config={"use_rotary_positional_embeddings": False})
    with pytest.raises(ValueError, match="cannot tell the position scheme.*use_rotary"):
        convert_sat_transformer(sat)  # a hidden size no released CogVideoX has, and no RoPE tables


def test_15_shapes_that_cannot_be_told_apart_are_named():
    """A 1.5 (Linear patch embedding) checkpoint whose shapes do not fit the 1.5 layout: one line naming the SAT
    key and what is valid."""
    sat = to_sat_transformer(CogVideoXTransformer3DModel(**CONFIGS["rope_15_5b_i2v_like"]).state_dict(), 2)
    proj, final, ofs = (P + "mixins.patch_embed.proj.weight", P + "mixins.final_layer.linear.weight",
                        P + "ofs_embed.0.weight")
    cases = [  # (changed SAT tensors, network_config, use_rotary, the message)
        ({proj: torch.zeros(64, 36)}, {}, None,
         rf"'{re.escape(proj)}' is a Linear \(64, 36\) \(CogVideoX 1\.5 layout\) whose 36 in-features are not "
         r"in_channels x patch_size_t x patch_size² = C x 2 x 2²; valid: a multiple of 8"),
        ({}, {"patch_size": 3}, None, r"64 in-features are not .* = C x 2 x 3²; valid: a multiple of 18"),
        ({proj: torch.zeros(64, 8, 2, 2, 2)}, {}, None,
         rf"'{re.escape(proj)}' has shape \(64, 8, 2, 2, 2\); valid: a Conv2d weight \(D, C, p, p\) "
         r"\(CogVideoX 1\.0\) or a Linear weight \(D, C·pt·p·p\) \(CogVideoX 1\.5\)"),
        ({final: torch.zeros(20, 64)}, {}, None,
         rf"'{re.escape(final)}' has 20 outputs, not out_channels x patch_size_t x patch_size²; valid: a multiple of 8"),
        ({ofs: torch.zeros(16, 16)}, {}, None,
         rf"'{re.escape(ofs)}' has shape \(16, 16\); .* valid: \(24, 24\) \(time_embed_dim 24"),
        ({P + "mixins.pos_embed.pos_embedding": torch.zeros(1, 19, 64)}, {}, None,
         r"'model\.diffusion_model\.mixins\.pos_embed\.pos_embedding' is a position table, which CogVideoX 1\.5 "
         r".* does not have; valid: a 1\.0 checkpoint"),
        ({}, {}, False, rf"'{re.escape(proj)}' is a Linear \(64, 64\) \(CogVideoX 1\.5 layout\), which has 3D RoPE; "
         r"use_rotary=False contradicts it \(valid: use_rotary=True or unset\)"),
    ]
    for change, network_config, use_rotary, message in cases:
        with pytest.raises(BadInput, match=message) as info:
            convert_sat_transformer({**sat, **change}, use_rotary=use_rotary, network_config=network_config)
        assert "\n" not in str(info.value)


def test_vae_config_mismatch_names_the_key_and_both_shapes():
    state = convert_sat_vae(to_sat_vae(AutoencoderKLCogVideoX(**TINY_VAE).state_dict(), n_up=3))
    with pytest.raises(ValueError, match=r"'encoder\.conv_out\.conv\.weight' has shape \(8, 16, 3, 3, 3\) in the "
                                         r"checkpoint but \(16, 16, 3, 3, 3\) in the network config"):
        build_vae(state, {"norm_num_groups": 4, "latent_channels": 8})


# -- CLI -------------------------------------------------------------------------------------------------------


def test_cli_writes_loadable_folders(tmp_path, capsys):
    ref, path = sat_file(tmp_path, "sincos_2b_like")
    vae = perturbed(AutoencoderKLCogVideoX(**TINY_VAE))
    torch.save({"state_dict": to_sat_vae(vae.state_dict(), n_up=3)}, tmp_path / "3d-vae.pt")
    out = tmp_path / "out"
    rc = main(["--transformer", str(path), "--vae", str(tmp_path / "3d-vae.pt"), "--out", str(out), "--num-layers", "2",
               "--no-rotary", "--network-config", json.dumps(sizes(TINY)), "--vae-config", '{"norm_num_groups": 4}'])
    assert rc == 0 and "wrote" in capsys.readouterr().out

    ours = DiffusionTransformer.from_pretrained(out).eval()
    x, t, context = inputs(TINY)
    with torch.no_grad():
        assert relative_error(ours(x, t, context), reference_forward(ref, x, t, context)) < 1e-5
        z = torch.randn(1, 4, 3, 4, 4)
        loaded = AutoencoderKLCogVideoX.from_pretrained(out / "vae").eval()
        assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)

    # an existing, non-empty out folder is refused (through `python -m`, one line, non-zero exit)
    run = subprocess.run([sys.executable, "-m", "vdm.convert.sat", "--transformer", str(path), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [f"error: {out} already exists and is not an empty folder; "
                                               "choose a new --out"]


@pytest.mark.parametrize("name", ["rope_15_5b_like", "rope_15_5b_i2v_like"])
def test_cli_writes_a_15_folder_that_diffusers_loads(tmp_path, capsys, name):
    """A converted 1.5 folder says so in transformer/config.json (patch_size_t 2; 1.5-I2V's ofs_embed_dim), loads
    in diffusers with the SAT model's weights, and its VAE is 1.5's (scaling_factor 0.7, invert_scale_latents)."""
    config = CONFIGS[name]
    ref, path = sat_file(tmp_path, name)
    torch.save({"state_dict": to_sat_vae(AutoencoderKLCogVideoX(**TINY_VAE).state_dict(), n_up=3)},
               tmp_path / "3d-vae.pt")
    out = tmp_path / "out"
    assert main(["--transformer", str(path), "--vae", str(tmp_path / "3d-vae.pt"), "--out", str(out),
                 "--network-config", json.dumps(sizes(config)), "--vae-config", '{"norm_num_groups": 4}']) == 0
    written = json.loads((out / "transformer" / "config.json").read_text())
    assert (written["patch_size_t"], written["patch_bias"], written["use_rotary_positional_embeddings"]) == (2, False, True)
    assert written["ofs_embed_dim"] == config.get("ofs_embed_dim") and written["in_channels"] == config["in_channels"]
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert (vae_config["scaling_factor"], vae_config["invert_scale_latents"]) == (0.7, True)

    loaded = CogVideoXTransformer3DModel.from_pretrained(out / "transformer").eval()
    assert loaded.config.patch_size_t == 2 and loaded.config.ofs_embed_dim == config.get("ofs_embed_dim")
    x, t, context = inputs(config)
    with torch.no_grad():
        assert torch.equal(reference_forward(loaded, x, t, context), reference_forward(ref, x, t, context))


def test_cli_refuses_a_forbidden_global_in_one_line(tmp_path, capsys):
    path, marker = rigged_training_save(tmp_path)
    assert main(["--transformer", str(path), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path} contains the Python global {os.system.__module__}.system, which vdm refuses to "
                   "execute: only tensors and numpy RNG state are accepted. Re-save only its tensors (the state dict) "
                   "where you trust the file"]
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["--transformer", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pt: no such file" in err[0]
    assert not (tmp_path / "o").exists()
