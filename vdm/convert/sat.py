"""SAT (SwissArmyTransformer) CogVideoX checkpoints -> vdm / diffusers format.

CogVideoX was trained and first released with THUDM's SAT code: the transformer lives in
`mp_rank_00_model_states.pt` (`{"module": {"model.diffusion_model.…": tensor}}`), the 3D VAE in
`3d-vae.pt` (`{"state_dict": {...}}`). vdm's DiffusionTransformer uses diffusers' parameter names, so
converting means renaming, splitting the fused q/k/v projection and splitting SAT's one 12-way adaLN
modulation per layer into the two 6-way ones (`norm1`, `norm2`). The mapping follows diffusers'
`scripts/convert_cogvideox_to_diffusers.py`; every key is either mapped, or a known non-parameter
that is dropped (and logged), or an error naming it.

CogVideoX 1.5 (CogVideoX1.5-5B, -5B-I2V; SAT's `cogvideox1.5_5b*.yaml`, `patch_size: [2, 2, 2]`) is told from
1.0 by its patch embedding, a Linear layer instead of a Conv2d; every other key maps as in 1.0:

    mixins.patch_embed.proj.{weight,bias}     patch_embed.proj  (Linear, in-features ordered (C, pt, ph, pw))
    mixins.final_layer.linear.{weight,bias}   proj_out          (pt·p·p·out_channels outputs, (C, pt, ph, pw))
    ofs_embed.{0,2}.{weight,bias}             ofs_embedding.linear_{1,2}  (1.5-I2V; ofs_embed_dim = its width)

The weights cannot tell the patch sizes apart from the channels (in-features = C·pt·p·p), so SAT's 1.5
convention pt = p = 2 is read (network_config `patch_size` / `patch_size_t` override it). 1.5 implies 3D RoPE
(sliced grid, no stored tables) and no learned position table; what its shapes do not say comes from SAT's and
diffusers' 1.5 configs: sample_height = sample_width = 300, sample_frames = 81, patch_bias false (a config flag
only: the Linear embedding has its bias either way). The VAE is then written with scaling_factor 0.7 and
`invert_scale_latents: true`, as diffusers' 1.5 conversion does; a VAE converted alone needs
`--vae-config '{"scaling_factor": 0.7, "invert_scale_latents": true}'` for 1.5.

CLI (writes `<out>/transformer/` and `<out>/vae/`, both diffusers folders):

    python -m vdm.convert.sat --transformer mp_rank_00_model_states.pt --vae 3d-vae.pt --out ckpt/
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX

from vdm.errors import AlreadyExists, BadInput, NotFound, UserError
from vdm.networks.dit import DiffusionTransformer
from vdm.safe_load import load_safely, short

log = logging.getLogger(__name__)

PREFIX = "model.diffusion_model."  # the network inside SAT's engine (SATVideoDiffusionEngine.model.diffusion_model)
# Other parts of the SAT engine that may share the file; they are not the transformer.
OTHER_ENGINE_PARTS = ("first_stage_model.", "conditioner.", "loss_fn.")

# CogVideoX hidden sizes whose position scheme is known: 2B adds fixed sin-cos tables, 5B rotates q/k (RoPE).
# (CogVideoX 1.5, 3072 wide, is RoPE whatever its width: its layout says so.)
KNOWN_ROTARY = {1920: False, 3072: True}
# CogVideoX 1.5's SAT `patch_size: [2, 2, 2]` (pt, ph, pw): the Linear patch embedding's shape cannot tell it.
SAT_15_PATCH_SIZE_T, SAT_15_PATCH_SIZE = 2, 2
# The sizes a 1.5 checkpoint's shapes do not say, as SAT's cogvideox1.5_5b*.yaml (latent 300 x 300, 81 frames)
# and diffusers' 1.5 conversion set them (network_config overrides them).
SAT_15_DEFAULTS = dict(sample_height=300, sample_width=300, sample_frames=81)

# --------------------------------------------------------------------------------------------------
# Reading a SAT file
# --------------------------------------------------------------------------------------------------


def load_sat_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat tensor dict of a SAT checkpoint, unwrapping `{"module": …}` / `{"state_dict": …}` / `{"model": …}`.

    A DeepSpeed training save stores, beside `module`, the run's RNG states (`random.getstate()`, torch's and
    `np.random.get_state()`); `vdm.safe_load.load_safely` reads them and refuses, in one line, a file whose pickle
    names any other Python global: nothing in it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path}: no such file (expected a SAT checkpoint such as "
                       "mp_rank_00_model_states.pt or 3d-vae.pt)")
    state = load_safely(path, accepted="tensors and numpy RNG state",
                        advice="re-save only its tensors (the state dict) where you trust the file", mmap=True)
    while isinstance(state, Mapping):
        inner = next((state[k] for k in ("module", "state_dict", "model") if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise BadInput(f"{path} holds a {type(state).__name__}, not a state dict")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise BadInput(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor (expected a state dict, "
                           "flat or under 'module' / 'state_dict')")
    return dict(state)


def check_state_dict(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor], source: str,
                     origin: Mapping[str, str] | None = None) -> None:
    """Same keys and shapes as `expected`, or a one-line error naming the key (and its SAT name) and both shapes."""
    origin = origin or {}

    def name(key: str) -> str:
        return f"{key!r} (SAT {origin[key]!r})" if key in origin and origin[key] != key else repr(key)

    missing = [k for k in expected if k not in state]
    if missing:
        raise BadInput(f"{source}: parameter {missing[0]!r} is missing from the checkpoint "
                       f"({len(missing)} missing in all)")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise BadInput(f"{source}: checkpoint parameter {name(unexpected[0])} has no place in the network "
                       f"({len(unexpected)} unexpected in all); check the network config")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key]):
            raise BadInput(f"{source}: parameter {name(key)} has shape {tuple(value.shape)} in the checkpoint "
                           f"but {tuple(expected[key])} in the network config")


# --------------------------------------------------------------------------------------------------
# The transformer
# --------------------------------------------------------------------------------------------------

_W = r"(weight|bias)"
# SAT key (without PREFIX) -> vdm key, one to one.
_RENAMES = [
    (rf"mixins\.patch_embed\.(proj|text_proj)\.{_W}", r"patch_embed.\1.\2"),
    (rf"time_embed\.0\.{_W}", r"time_embedding.linear_1.\1"),
    (rf"time_embed\.2\.{_W}", r"time_embedding.linear_2.\1"),
    (rf"ofs_embed\.0\.{_W}", r"ofs_embedding.linear_1.\1"),  # CogVideoX1.5-I2V
    (rf"ofs_embed\.2\.{_W}", r"ofs_embedding.linear_2.\1"),
    (rf"label_emb\.0\.0\.{_W}", r"vector_embedding.linear_1.\1"),  # num_classes="sequential" (adm) vectors
    (rf"label_emb\.0\.2\.{_W}", r"vector_embedding.linear_2.\1"),
    (rf"transformer\.layers\.(\d+)\.input_layernorm\.{_W}", r"transformer_blocks.\1.norm1.norm.\2"),
    (rf"transformer\.layers\.(\d+)\.post_attention_layernorm\.{_W}", r"transformer_blocks.\1.norm2.norm.\2"),
    (rf"transformer\.layers\.(\d+)\.attention\.dense\.{_W}", r"transformer_blocks.\1.attn1.to_out.0.\2"),
    (rf"transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.{_W}", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    (rf"transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.{_W}", r"transformer_blocks.\1.ff.net.2.\2"),
    (rf"mixins\.adaln_layer\.query_layernorm_list\.(\d+)\.{_W}", r"transformer_blocks.\1.attn1.norm_q.\2"),
    (rf"mixins\.adaln_layer\.key_layernorm_list\.(\d+)\.{_W}", r"transformer_blocks.\1.attn1.norm_k.\2"),
    (rf"transformer\.final_layernorm\.{_W}", r"norm_final.\1"),
    (rf"mixins\.final_layer\.norm_final\.{_W}", r"norm_out.norm.\1"),
    # SAT's final layer chunks its modulation as (shift, scale), the order diffusers' AdaLayerNorm(chunk_dim=1) reads.
    (rf"mixins\.final_layer\.adaLN_modulation\.1\.{_W}", r"norm_out.linear.\1"),
    # SAT unpatchifies "(c o p q)" (1.0: "(c p q)"), channels outermost, as diffusers does: no reordering.
    (rf"mixins\.final_layer\.linear\.{_W}", r"proj_out.\1"),
]
_QKV = re.compile(rf"transformer\.layers\.(\d+)\.attention\.query_key_value\.{_W}")
_ADALN = re.compile(rf"mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.{_W}")
_POS_EMBEDDING = "mixins.pos_embed.pos_embedding"
_PATCH_PROJ = "mixins.patch_embed.proj.weight"
# Not parameters of the network: RoPE tables (5B) and SAT base-model embeddings that CogVideoX never reads.
_NON_PARAMETERS = re.compile(r"mixins\.pos_embed\.freqs_(sin|cos)|transformer\.(position|word)_embeddings\.weight")

# SAT's 12-way adaLN chunk order is (shift, scale, gate) x (attention, MLP) for video, then the same for text;
# vdm's norm1 / norm2 each read (shift, scale, gate, text_shift, text_scale, text_gate).
_NORM1_CHUNKS, _NORM2_CHUNKS = (0, 1, 2, 6, 7, 8), (3, 4, 5, 9, 10, 11)


def convert_sat_transformer(state: Mapping[str, torch.Tensor], num_layers: int | None = None,
                            use_rotary: bool | None = None, network_config: Mapping | None = None,
                            source: str = "SAT transformer") -> tuple[dict[str, torch.Tensor], dict]:
    """SAT CogVideoX transformer state -> (vdm state dict, `DiffusionTransformer(**hparams)` arguments).

    Hyper-parameters come from tensor shapes; `network_config` overrides them (and sets what shapes cannot
    tell, e.g. `sample_height`), and the result is checked against that network's shapes. `num_layers`, when
    given, must match the checkpoint. `use_rotary`: 3D RoPE (5B) or sin-cos positions (2B); inferred for the
    released hidden sizes and for CogVideoX 1.5 (always RoPE), required otherwise.
    """
    network_config = dict(network_config or {})
    sat, prefix = _strip_prefix(state, source)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # vdm key -> SAT key, for error messages
    pos_embedding, dropped = None, []

    def put(key: str, value: torch.Tensor, sat_key: str) -> None:
        out[key] = value
        origin[key] = prefix + sat_key

    renames = [(re.compile(pattern), target) for pattern, target in _RENAMES]
    for key, value in sat.items():
        if _NON_PARAMETERS.fullmatch(key):
            dropped.append(key)
        elif key == _POS_EMBEDDING:
            pos_embedding = value
        elif m := _QKV.fullmatch(key):
            layer, kind = m.groups()
            if value.shape[0] % 3:
                raise BadInput(f"{source}: {prefix + key} has {value.shape[0]} rows, not a multiple of 3 (q, k, v)")
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                put(f"transformer_blocks.{layer}.attn1.{name}.{kind}", part.clone(), key)
        elif m := _ADALN.fullmatch(key):
            layer, kind = m.groups()
            if value.shape[0] % 12:
                raise BadInput(f"{source}: {prefix + key} has {value.shape[0]} rows, not a multiple of 12 "
                               "(shift, scale, gate for attention and MLP, video and text)")
            chunks = value.chunk(12, dim=0)
            put(f"transformer_blocks.{layer}.norm1.linear.{kind}", torch.cat([chunks[i] for i in _NORM1_CHUNKS]), key)
            put(f"transformer_blocks.{layer}.norm2.linear.{kind}", torch.cat([chunks[i] for i in _NORM2_CHUNKS]), key)
        else:
            for pattern, target in renames:
                if pattern.fullmatch(key):
                    put(pattern.sub(target, key), value, key)
                    break
            else:
                raise BadInput(f"{source}: unknown SAT key {prefix + key!r}; vdm does not know where it belongs "
                               "(not a CogVideoX 1.0 or 1.5 transformer parameter)")

    hparams = _infer_transformer_hparams(out, source, prefix, network_config)
    is_15 = hparams.get("patch_size_t") is not None
    if num_layers is not None and num_layers != hparams["num_layers"]:
        raise BadInput(f"{source}: num_layers={num_layers} but the checkpoint has {hparams['num_layers']} layers")
    from_config = network_config.get("use_rotary_positional_embeddings")
    if use_rotary is not None and from_config is not None and bool(use_rotary) != bool(from_config):
        raise BadInput(f"{source}: use_rotary={use_rotary} contradicts network_config "
                       f"use_rotary_positional_embeddings={from_config}")
    if use_rotary is None:
        use_rotary = from_config
    if is_15:
        if use_rotary is not None and not use_rotary:
            shape = tuple(out["patch_embed.proj.weight"].shape)
            raise BadInput(f"{source}: {prefix + _PATCH_PROJ!r} is a Linear {shape} (CogVideoX 1.5 layout), which has "
                           "3D RoPE; use_rotary=False contradicts it (valid: use_rotary=True or unset)")
        if pos_embedding is not None:
            raise BadInput(f"{source}: {prefix + _POS_EMBEDDING!r} is a position table, which CogVideoX 1.5 (a Linear "
                           f"{prefix + _PATCH_PROJ!r}) does not have; valid: a 1.0 checkpoint (Conv2d patch "
                           "embedding) with it, or a 1.5 one without it")
        use_rotary = True
        for key, value in SAT_15_DEFAULTS.items():
            hparams.setdefault(key, value)
    if use_rotary is None:
        use_rotary = _infer_rotary(hparams["hidden_size"], any(k.startswith("mixins.pos_embed.freqs") for k in dropped),
                                   source)
    hparams["use_rotary_positional_embeddings"] = bool(use_rotary)
    if pos_embedding is not None:
        if use_rotary:  # 5B-I2V: a learned table over [text | video] tokens
            put("patch_embed.pos_embedding", pos_embedding, _POS_EMBEDDING)
            hparams["use_learned_positional_embeddings"] = True
        else:  # 2B: SAT stores its fixed sin-cos table; vdm recomputes it
            dropped.append(_POS_EMBEDDING)

    hidden_size = hparams.pop("hidden_size")
    hparams["attention_head_dim"] = hidden_size // hparams["num_attention_heads"]
    hparams.update(network_config)
    _check_transformer(out, hparams, source, origin)
    if dropped:
        log.info("%s: dropped %d non-parameter tensor(s): %s", source, len(dropped), ", ".join(sorted(dropped)))
    return out, hparams


def _strip_prefix(state: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The network's keys relative to `model.diffusion_model.` (a bare network state is accepted as is),
    and the prefix they had."""
    if not any(k.startswith(PREFIX) for k in state):
        return dict(state), ""
    sat, others = {}, []
    for key, value in state.items():
        if key.startswith(PREFIX):
            sat[key[len(PREFIX):]] = value
        elif key.startswith(OTHER_ENGINE_PARTS):
            others.append(key)
        else:
            raise BadInput(f"{source}: unknown SAT key {key!r}; expected keys under {PREFIX!r}")
    if others:
        log.info("%s: skipped %d tensor(s) of other engine parts (%s)", source, len(others),
                 ", ".join(sorted({k.split('.')[0] for k in others})))
    return sat, PREFIX


def _require(state: Mapping[str, torch.Tensor], key: str, sat_key: str, source: str, ndim: int) -> torch.Tensor:
    if key not in state:
        raise BadInput(f"{source}: checkpoint has no {sat_key!r}; cannot infer the network shape")
    value = state[key]
    if value.ndim != ndim:
        raise BadInput(f"{source}: {sat_key!r} has shape {tuple(value.shape)}; expected {ndim} dimensions")
    return value


def _infer_transformer_hparams(state: Mapping[str, torch.Tensor], source: str, prefix: str,
                               network_config: Mapping | None = None) -> dict:
    """Hyper-parameters from the (renamed) state's shapes. A CogVideoX 1.5 patch embedding is a Linear whose
    in-features are in_channels x patch_size_t x patch_size², which shapes cannot split: its patch sizes are
    SAT's 1.5 ones unless `network_config` gives `patch_size` / `patch_size_t`."""
    network_config = network_config or {}

    def require(key: str, sat_key: str, ndim: int) -> torch.Tensor:
        return _require(state, key, prefix + sat_key, source, ndim)

    proj = state.get("patch_embed.proj.weight")
    if proj is None:
        raise BadInput(f"{source}: checkpoint has no {prefix + _PATCH_PROJ!r}; cannot infer the network shape")
    if proj.ndim == 4:  # CogVideoX 1.0: Conv2d (D, C, p, p), applied frame by frame
        hidden, in_channels, p, p_w = proj.shape
        if p != p_w:
            raise BadInput(f"{source}: patch embedding kernel {p}x{p_w} is not square")
        pt = None
    elif proj.ndim == 2:  # CogVideoX 1.5: Linear (D, C·pt·p·p) over (C, pt, ph, pw) features
        pt = network_config.get("patch_size_t") or SAT_15_PATCH_SIZE_T
        p = network_config.get("patch_size") or SAT_15_PATCH_SIZE
        hidden, features = proj.shape
        if features % (pt * p * p):
            raise BadInput(f"{source}: {prefix + _PATCH_PROJ!r} is a Linear {tuple(proj.shape)} (CogVideoX 1.5 "
                           f"layout) whose {features} in-features are not in_channels x patch_size_t x patch_size² = "
                           f"C x {pt} x {p}²; valid: a multiple of {pt * p * p}, or set network_config patch_size / "
                           "patch_size_t")
        in_channels = features // (pt * p * p)
    else:
        raise BadInput(f"{source}: {prefix + _PATCH_PROJ!r} has shape {tuple(proj.shape)}; valid: a Conv2d weight "
                       "(D, C, p, p) (CogVideoX 1.0) or a Linear weight (D, C·pt·p·p) (CogVideoX 1.5)")
    text = require("patch_embed.text_proj.weight", "mixins.patch_embed.text_proj.weight", 2)
    time = require("time_embedding.linear_1.weight", "time_embed.0.weight", 2)
    head = require("transformer_blocks.0.attn1.norm_q.weight", "mixins.adaln_layer.query_layernorm_list.0.weight", 1)
    out = require("proj_out.weight", "mixins.final_layer.linear.weight", 2)
    head_dim = head.shape[0]
    if hidden % head_dim:
        raise BadInput(f"{source}: hidden size {hidden} is not a multiple of the q/k layernorm width {head_dim}")
    patch = (pt or 1) * p * p
    if out.shape[0] % patch:
        what = "patch_size²" if pt is None else "patch_size_t x patch_size²"
        raise BadInput(f"{source}: {prefix + 'mixins.final_layer.linear.weight'!r} has {out.shape[0]} outputs, not "
                       f"out_channels x {what}; valid: a multiple of {patch}")
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    if layers != list(range(len(layers))) or not layers:
        raise BadInput(f"{source}: transformer layers are not numbered 0..N-1 (found {layers[:5]}...)")
    hparams = dict(
        hidden_size=hidden,
        num_attention_heads=hidden // head_dim,
        in_channels=in_channels,
        out_channels=out.shape[0] // patch,
        patch_size=p,
        text_embed_dim=text.shape[1],
        time_embed_dim=time.shape[0],
        num_layers=len(layers),
        attention_bias="transformer_blocks.0.attn1.to_q.bias" in state,
        # 1.0: the Conv2d's bias; 1.5 writes false (diffusers' 1.5 config) and its Linear has a bias regardless
        patch_bias="patch_embed.proj.bias" in state if pt is None else False,
        norm_elementwise_affine="transformer_blocks.0.norm1.norm.weight" in state,
    )
    if pt is not None:
        hparams["patch_size_t"] = pt
    if "ofs_embedding.linear_1.weight" in state:  # CogVideoX1.5-I2V: (ofs_embed_dim, ofs_embed_dim)
        ofs = require("ofs_embedding.linear_1.weight", "ofs_embed.0.weight", 2)
        width = time.shape[0]
        if tuple(ofs.shape) != (width, width):
            raise BadInput(f"{source}: {prefix + 'ofs_embed.0.weight'!r} has shape {tuple(ofs.shape)}; the ofs "
                           f"embedding is added to the time embedding, so valid: ({width}, {width}) (time_embed_dim "
                           f"{width}, from {prefix + 'time_embed.0.weight'!r})")
        hparams["ofs_embed_dim"] = ofs.shape[1]
    if "vector_embedding.linear_1.weight" in state:
        hparams["vector_dim"] = state["vector_embedding.linear_1.weight"].shape[1]
    return hparams


def _infer_rotary(hidden: int, has_rope_tables: bool, source: str) -> bool:
    if has_rope_tables:
        return True
    if hidden in KNOWN_ROTARY:
        return KNOWN_ROTARY[hidden]
    raise BadInput(f"{source}: cannot tell the position scheme of a hidden size {hidden} network; pass "
                   "use_rotary=True (3D RoPE, as CogVideoX-5B) or False (sin-cos, as 2B) (CLI: --rotary / --no-rotary)")


def _check_transformer(state, hparams: dict, source: str, origin: Mapping[str, str]) -> None:
    with torch.device("meta"):
        network = DiffusionTransformer(**hparams)
    check_state_dict({k: v.shape for k, v in network.state_dict().items()}, state, source, origin)


# --------------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------------

_VAE_PARTS = {"encoder": ("conv_in", "down", "mid", "norm_out", "conv_out"),
              "decoder": ("conv_in", "mid", "up", "norm_out", "conv_out")}


def convert_sat_vae(state: Mapping[str, torch.Tensor], source: str = "SAT VAE") -> dict[str, torch.Tensor]:
    """SAT `3d-vae.pt` keys -> diffusers `AutoencoderKLCogVideoX` keys (training-loss weights are dropped).

    SAT lists the decoder's `up` levels by resolution (0 = full size, applied last); diffusers numbers
    `up_blocks` in the order they run, so level i becomes up_blocks[n-1-i].
    """
    up_levels = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    n_up = max(up_levels, default=-1) + 1
    out, dropped = {}, 0
    for key, value in state.items():
        if key.startswith("loss."):
            dropped += 1
            continue
        side, _, rest = key.partition(".")
        if side not in _VAE_PARTS or rest.split(".")[0] not in _VAE_PARTS[side]:
            raise BadInput(f"{source}: unknown SAT VAE key {key!r} (expected encoder.* / decoder.* parts "
                           f"{sorted(set(_VAE_PARTS['encoder']) | set(_VAE_PARTS['decoder']))}, or loss.*)")
        rest = re.sub(r"^mid\.block_([12])\.", lambda m: f"mid_block.resnets.{int(m.group(1)) - 1}.", rest)
        rest = re.sub(r"^down\.(\d+)\.block\.", r"down_blocks.\1.resnets.", rest)
        rest = re.sub(r"^down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0.", rest)
        rest = re.sub(r"^up\.(\d+)\.block\.", lambda m: f"up_blocks.{n_up - 1 - int(m.group(1))}.resnets.", rest)
        rest = re.sub(r"^up\.(\d+)\.upsample\.", lambda m: f"up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0.", rest)
        rest = rest.replace(".nin_shortcut.", ".conv_shortcut.")
        if re.match(r"(down|up|mid)\.", rest):  # e.g. attention blocks, which CogVideoX's VAE does not have
            raise BadInput(f"{source}: unknown SAT VAE key {key!r}; only resnet blocks and resamplers are supported")
        out[f"{side}.{rest}"] = value
    if dropped:
        log.info("%s: dropped %d training-loss tensor(s) (loss.*)", source, dropped)
    return out


def infer_vae_config(state: Mapping[str, torch.Tensor], source: str = "SAT VAE") -> dict:
    """`AutoencoderKLCogVideoX` arguments readable from a converted (diffusers-named) VAE state's shapes.

    Not readable from shapes (diffusers' CogVideoX defaults apply): norm_num_groups, temporal_compression_ratio,
    scaling_factor.
    """
    def weight(key: str) -> torch.Tensor:
        if key not in state:
            raise BadInput(f"{source}: VAE checkpoint has no {key!r} (diffusers name); cannot infer its config")
        return state[key]

    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    if not levels:
        raise BadInput(f"{source}: VAE checkpoint has no encoder.down.* blocks")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
    return dict(
        in_channels=weight("encoder.conv_in.conv.weight").shape[1],
        out_channels=weight("decoder.conv_out.conv.weight").shape[0],
        latent_channels=weight("encoder.conv_out.conv.weight").shape[0] // 2,  # mean and log-variance
        block_out_channels=[weight(f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight").shape[0] for i in levels],
        down_block_types=["CogVideoXDownBlock3D"] * len(levels),
        up_block_types=["CogVideoXUpBlock3D"] * len(levels),
        layers_per_block=len(blocks),
    )


def build_vae(state: Mapping[str, torch.Tensor], config: Mapping | None = None,
              source: str = "SAT VAE") -> AutoencoderKLCogVideoX:
    """A diffusers `AutoencoderKLCogVideoX` holding a converted state (config: defaults <- shapes <- `config`)."""
    config = {**infer_vae_config(state, source), **(config or {})}
    try:
        with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
            vae = AutoencoderKLCogVideoX(**config)
    except (TypeError, ValueError) as e:
        raise BadInput(f"{source}: the VAE config does not build an AutoencoderKLCogVideoX ({short(e)}); "
                       "set its options explicitly (CLI: --vae-config)") from None
    check_state_dict({k: v.shape for k, v in vae.state_dict().items()}, state, source)
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval()


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

_DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _read_json(arg: str | None, flag: str) -> dict:
    if arg is None:
        return {}
    text = arg if arg.lstrip().startswith("{") else Path(arg).read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{flag}: {arg!r} is neither a JSON file nor JSON text ({e})") from None
    if not isinstance(value, dict):
        raise BadInput(f"{flag}: expected a JSON object, got {type(value).__name__}")
    return value


def convert(transformer: str | None, vae: str | None, out: str, num_layers: int | None = None,
            use_rotary: bool | None = None, network_config: Mapping | None = None,
            vae_config: Mapping | None = None, dtype: torch.dtype | None = None) -> list[Path]:
    """Convert SAT files into `<out>/transformer` and `<out>/vae`; everything is converted and checked before
    anything is written. Returns the folders written."""
    if transformer is None and vae is None:
        raise BadInput("nothing to convert: give --transformer and/or --vae")
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise AlreadyExists(f"{out_dir} already exists and is not an empty folder; choose a new --out")
    def cast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if dtype is None:
            return state
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    network = vae_model = None
    vae_config = dict(vae_config or {})
    if transformer is not None:
        state, hparams = convert_sat_transformer(load_sat_checkpoint(transformer), num_layers, use_rotary,
                                                 network_config, source=str(transformer))
        with torch.device("meta"):
            network = DiffusionTransformer(**hparams)
        network.load_checked_state_dict(cast(state), source=str(transformer), assign=True)
        is_15 = network.config.patch_size_t is not None
        if (network.config.hidden_size == 3072 or is_15) and "scaling_factor" not in vae_config:
            vae_config["scaling_factor"] = 0.7  # CogVideoX-5B's and 1.5's latent scale (2B: diffusers' 1.15258426)
            log.info("5B-sized or 1.5 transformer: writing the VAE with scaling_factor=0.7")
        if is_15 and "invert_scale_latents" not in vae_config:
            vae_config["invert_scale_latents"] = True  # 1.5 (diffusers' --version 1.5): image latents divided
            log.info("CogVideoX 1.5 transformer: writing the VAE with invert_scale_latents=true")
    if vae is not None:
        vae_state = cast(convert_sat_vae(load_sat_checkpoint(vae), source=str(vae)))
        vae_model = build_vae(vae_state, vae_config, source=str(vae))
    written = []
    if network is not None:
        written.append(network.save_pretrained(out_dir / "transformer"))
    if vae_model is not None:
        vae_model.save_pretrained(out_dir / "vae", safe_serialization=True)
        written.append(out_dir / "vae")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdm.convert.sat", description=__doc__.splitlines()[0])
    parser.add_argument("--transformer", help="SAT transformer file (mp_rank_00_model_states.pt)")
    parser.add_argument("--vae", help="SAT VAE file (3d-vae.pt)")
    parser.add_argument("--out", required=True, help="new (or empty) output folder")
    parser.add_argument("--num-layers", type=int, help="expected number of transformer layers (checked)")
    parser.add_argument("--rotary", action=argparse.BooleanOptionalAction, default=None,
                        help="3D RoPE (5B) or sin-cos (2B) positions; inferred for the released model sizes "
                             "and for 1.5 (always RoPE)")
    parser.add_argument("--network-config", help="JSON (file or text) of DiffusionTransformer options, e.g. sample size")
    parser.add_argument("--vae-config", help="JSON (file or text) of AutoencoderKLCogVideoX options "
                                             "(default: CogVideoX's, with channels read from the weights)")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="keep", help="weight dtype to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = convert(args.transformer, args.vae, args.out, args.num_layers, args.rotary,
                          _read_json(args.network_config, "--network-config"), _read_json(args.vae_config, "--vae-config"),
                          _DTYPES[args.dtype])
    except (UserError, OSError) as e:  # OSError: an output folder that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
