"""DiffusionTransformer: the CogVideoX MM-DiT (3D full attention over `[text | video]` tokens).

Reads top to bottom: the config, embedders, the block, the network, checkpoint I/O; positions and the patch
embedding live in `vdm.networks.embeddings`.
Parameter names follow diffusers' `CogVideoXTransformer3DModel`, so real CogVideoX checkpoints in
diffusers format load without any key surgery (`from_pretrained`) and ours load in diffusers
(`save_pretrained`).

Shapes: x is `B T C H W` (latent frames T); tokens N = L_text + T·(H/p)·(W/p); width D.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from vdm.errors import BadInput
from vdm.networks.attention_control import AttentionCall, AttentionControl, CallContext
from vdm.networks.diffusers_io import load_transformer, save_transformer
from vdm.networks.embeddings import PatchEmbed, TokenGrid, apply_rope, rope_3d, sincos_3d, timestep_embedding
from vdm.networks.sequence_parallel import SequenceShards

log = logging.getLogger(__name__)

OFS = 2.0  # CogVideoX1.5-5B-I2V's ofs value: diffusers' CogVideoXImageToVideoPipeline and SAT both pass 2.0



# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class DiTConfig:
    """CogVideoX hyper-parameters (diffusers' names). Defaults are CogVideoX-2B."""

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    num_layers: int = 30
    sample_width: int = 90  # latent width the model was trained at (maximum input width)
    sample_height: int = 60
    sample_frames: int = 49  # pixel frames; latent frames = (sample_frames - 1) // r + 1
    patch_size: int = 2
    patch_size_t: int | None = None  # CogVideoX 1.5: 2 adjacent latent frames per token (a linear patch embedding)
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    dropout: float = 0.0
    attention_bias: bool = True
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True  # the 1.0 Conv2d patch embedding's bias (1.5's linear embedding always has one)
    ofs_embed_dim: int | None = None  # CogVideoX1.5-5B-I2V: an "ofs" embedding (of OFS) added to the time one
    vector_dim: int | None = None  # vdm extra: vector conditioning added to the time embedding
    # vdm extra: > 0 puts a GELU layer of this width before the output projection. A linear projection from
    # the hidden size can only reach hidden_size of the patch_size²·out_channels output values; a small model
    # whose width is below its token size (the synthetic default: 128 < 192) draws soft edges without one.
    head_hidden_dim: int = 0

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def max_latent_frames(self) -> int:
        """The latent frames of `sample_frames` pixel frames (1.5: before the padding to whole tokens)."""
        return (self.sample_frames - 1) // self.temporal_compression_ratio + 1

    @property
    def frames_per_token(self) -> int:
        return self.patch_size_t or 1

    def padded_frames(self, latent_frames: int) -> int:
        """Latent frames the network takes for `latent_frames` decoded ones: 1.5 rounds up to whole tokens (the
        extra noise latents go in front and are dropped before decoding, as diffusers' pipeline does)."""
        k = self.frames_per_token
        return -(-latent_frames // k) * k

    def decodable_frames(self, latent_frames: int) -> int:
        """How many of `latent_frames` sampled latents are decoded (the last ones): 1.5 drops the front padding,
        which leaves the odd count the causal VAE decodes."""
        return latent_frames - (self.frames_per_token - 1) * (1 - latent_frames % 2)

    def validate(self) -> None:
        positive = ["num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "time_embed_dim",
                    "text_embed_dim", "num_layers", "sample_width", "sample_height", "sample_frames", "patch_size",
                    "temporal_compression_ratio", "max_text_seq_length"]
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise BadInput(f"network.{name}={getattr(self, name)} must be a positive integer")
        if int(self.head_hidden_dim) < 0:
            raise BadInput(f"network.head_hidden_dim={self.head_hidden_dim} must be 0 (CogVideoX's linear output "
                           "projection) or a positive width")
        p = self.patch_size
        for name in ("sample_height", "sample_width"):
            if getattr(self, name) % p:
                raise BadInput(f"network.{name}={getattr(self, name)} is not divisible by patch_size={p}")
        if self.use_rotary_positional_embeddings and self.attention_head_dim % 16:
            raise BadInput(f"network.attention_head_dim={self.attention_head_dim} must be a multiple of 16 "
                           "for 3D RoPE (split t:h:w = 1/4 : 3/8 : 3/8 into even parts)")
        if not self.use_rotary_positional_embeddings and self.hidden_size % 16:
            raise BadInput(f"network hidden size {self.hidden_size} (heads x head_dim) must be a multiple of 16 "
                           "for 3D sin-cos positions")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise BadInput("network.use_learned_positional_embeddings=true requires "
                           "use_rotary_positional_embeddings=true (as in CogVideoX-5B-I2V)")
        if self.patch_size_t is not None:
            if self.patch_size_t != 2:
                raise BadInput(f"network.patch_size_t={self.patch_size_t}: only 2 (CogVideoX 1.5) or null (1.0) "
                               "is supported")
            if not self.use_rotary_positional_embeddings or self.use_learned_positional_embeddings:
                raise BadInput("network.patch_size_t (CogVideoX 1.5) needs use_rotary_positional_embeddings=true "
                               "and use_learned_positional_embeddings=false, as the released 1.5 models have")
        if self.ofs_embed_dim is not None and self.ofs_embed_dim != self.time_embed_dim:
            raise BadInput(f"network.ofs_embed_dim={self.ofs_embed_dim} must equal time_embed_dim="
                           f"{self.time_embed_dim} (the ofs embedding is added to the time embedding)")


def _make_config(num_attention_heads: int = 30, attention_head_dim: int | None = None,
                 hidden_size: int | None = None, **kwargs) -> DiTConfig:
    """Accept either `attention_head_dim` or the SAT-style `hidden_size` (which heads must divide)."""
    if hidden_size is not None:
        if hidden_size % num_attention_heads:
            raise BadInput(f"network.num_attention_heads={num_attention_heads} does not divide "
                           f"network.hidden_size={hidden_size}")
        head_dim = hidden_size // num_attention_heads
        if attention_head_dim is not None and attention_head_dim != head_dim:
            raise BadInput(f"network.attention_head_dim={attention_head_dim} contradicts hidden_size/heads={head_dim}")
        attention_head_dim = head_dim
    known = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise BadInput(f"unknown network option(s) {unknown}; valid: {sorted(known | {'hidden_size'})}")
    config = DiTConfig(num_attention_heads=num_attention_heads,
                       attention_head_dim=64 if attention_head_dim is None else attention_head_dim, **kwargs)
    config.validate()
    return config


# --------------------------------------------------------------------------------------------------
# Embedders and block
# --------------------------------------------------------------------------------------------------


class MLPEmbedding(nn.Module):
    """Linear-SiLU-Linear (the timestep / vector embedding MLP)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ExpertAdaLN(nn.Module):
    """LayerNorm with separate shift/scale/gate for text and video tokens, from the time embedding."""

    def __init__(self, time_dim: int, dim: int, elementwise_affine: bool, eps: float):
        super().__init__()
        self.linear = nn.Linear(time_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, video: torch.Tensor, text: torch.Tensor, emb: torch.Tensor):
        shift, scale, gate, t_shift, t_scale, t_gate = self.linear(F.silu(emb))[:, None].chunk(6, dim=-1)
        video = self.norm(video) * (1 + scale) + shift
        text = self.norm(text) * (1 + t_scale) + t_shift
        return video, text, gate, t_gate


class Attention(nn.Module):
    """Joint self-attention with per-head q/k LayerNorm; the attention itself is the control's."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * head_dim, bias=bias)
        self.to_k = nn.Linear(dim, heads * head_dim, bias=bias)
        self.to_v = nn.Linear(dim, heads * head_dim, bias=bias)
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                control: AttentionControl, call: AttentionCall) -> torch.Tensor:
        q, k, v = (rearrange(f(x), "b n (h d) -> b h n d", h=self.heads) for f in (self.to_q, self.to_k, self.to_v))
        q, k = self.norm_q(q), self.norm_k(k)
        if call.shards is not None:  # Ulysses: every token of this process's heads (vdm.networks.sequence_parallel)
            q, k, v = (call.shards.to_heads(t) for t in (q, k, v))
        if rope is not None:  # the text tokens' rows are the identity rotation
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if q.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or v.dtype != torch.float32):
            # On the CPU the attention runs in float32 even under bf16 autocast or with bf16 weights: the CPU
            # flash kernel's backward took 3x as long in bf16 (bench/train_speed.py, README Schedules).
            with torch.autocast("cpu", enabled=False):
                out = control(q.float(), k.float(), v.float(), call).to(v.dtype)  # (B, heads, N, d)
        else:
            out = control(q, k, v, call)  # (B, heads, N, d)
        if call.shards is not None:
            out = call.shards.to_tokens(out)
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))


class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim),
                                  nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class DiTBlock(nn.Module):
    """Expert adaLN -> joint attention -> gated residual; expert adaLN -> GELU(tanh) MLP -> gated residual."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        c, d = config, config.hidden_size
        self.norm1 = ExpertAdaLN(c.time_embed_dim, d, c.norm_elementwise_affine, c.norm_eps)
        self.attn1 = Attention(d, c.num_attention_heads, c.attention_head_dim, c.attention_bias)
        self.norm2 = ExpertAdaLN(c.time_embed_dim, d, c.norm_elementwise_affine, c.norm_eps)
        self.ff = FeedForward(d, c.dropout)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, video, text, emb, rope, control: AttentionControl, call: AttentionCall):
        L = text.shape[1]
        norm_video, norm_text, gate, t_gate = self.norm1(video, text, emb)
        tokens = torch.cat([norm_text, norm_video], dim=1)
        if call.cache is None:
            out = self.attn1(tokens, rope, control, call)
        else:  # a step cache may hand back this layer's output of an earlier step (vdm.networks.caches)
            out = call.cache.attention(call.layer_idx, lambda: self.attn1(tokens, rope, control, call))
        out = self.dropout(out)
        video, text = video + gate * out[:, L:], text + t_gate * out[:, :L]
        norm_video, norm_text, gate, t_gate = self.norm2(video, text, emb)
        out = self.ff(torch.cat([norm_text, norm_video], dim=1))
        return video + gate * out[:, L:], text + t_gate * out[:, :L]


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------


class DiffusionTransformer(nn.Module):
    """CogVideoX MM-DiT predicting v for `B T C H W` latents.

    `forward(x, timesteps, context, y=None, step_idx=None, ctx=None)`: `context` is the text, `ctx` (a
    `CallContext`) says how the blocks attend — plain attention when None. The network holds no
    attention state of its own: switching controls changes no parameter and no attribute.
    """

    def __init__(self, gradient_checkpointing: bool = False, **hparams):
        super().__init__()
        self.config = config = _make_config(**hparams)
        d = config.hidden_size
        self.gradient_checkpointing = gradient_checkpointing
        # Fixed position tables by (T, h, w, device, dtype), built on first use (see `positions`). A plain
        # dict, not buffers: derived from the config, so never in state_dict, and empty under meta init.
        self.position_cache: dict[tuple, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}

        self.patch_embed = PatchEmbed(config)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.time_embedding = MLPEmbedding(d, config.time_embed_dim)
        self.ofs_embedding = MLPEmbedding(config.ofs_embed_dim, config.ofs_embed_dim) if config.ofs_embed_dim else None
        self.vector_embedding = MLPEmbedding(config.vector_dim, config.time_embed_dim) if config.vector_dim else None
        self.transformer_blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.num_layers)])
        self.norm_final = nn.LayerNorm(d, config.norm_eps, config.norm_elementwise_affine)
        self.norm_out = FinalAdaLN(config.time_embed_dim, d, config.norm_elementwise_affine, config.norm_eps)
        patch_out = config.patch_size**2 * config.frames_per_token * config.out_channels
        if config.head_hidden_dim:
            self.proj_out = nn.Sequential(GELUProj(d, config.head_hidden_dim),
                                          nn.Linear(config.head_hidden_dim, patch_out))
        else:
            self.proj_out = nn.Linear(d, patch_out)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT-style: xavier linears, zero biases; adaLN modulation and output projection start at zero,
        so every block starts as the identity and the untrained network predicts v = 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for mlp in filter(None, (self.time_embedding, self.vector_embedding, self.ofs_embedding)):
            nn.init.normal_(mlp.linear_1.weight, std=0.02)
            nn.init.normal_(mlp.linear_2.weight, std=0.02)
        for block in self.transformer_blocks:
            for norm in (block.norm1, block.norm2):
                nn.init.zeros_(norm.linear.weight)
                nn.init.zeros_(norm.linear.bias)
        last = self.proj_out[-1] if isinstance(self.proj_out, nn.Sequential) else self.proj_out
        for layer in (self.norm_out.linear, last):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- forward ------------------------------------------------------------------------------------

    def check_input(self, x: torch.Tensor, context: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 5:
            raise BadInput(f"x must be B T C H W, got shape {tuple(x.shape)}")
        B, T, C, H, W = x.shape
        if C != c.in_channels:
            raise BadInput(f"x has {C} channels; network.in_channels={c.in_channels}")
        if H % c.patch_size or W % c.patch_size:
            raise BadInput(f"latent size {H}x{W} is not divisible by network.patch_size={c.patch_size}")
        if T % c.frames_per_token:
            raise BadInput(f"{T} latent frames are not whole tokens of network.patch_size_t={c.patch_size_t} frames "
                           f"(pad to {c.padded_frames(T)})")
        if T > c.padded_frames(c.max_latent_frames) or H > c.sample_height or W > c.sample_width:
            raise BadInput(f"latent T x H x W = {T}x{H}x{W} exceeds the configured maximum "
                           f"{c.max_latent_frames}x{c.sample_height}x{c.sample_width} "
                           "(network.sample_frames / sample_height / sample_width)")
        if context.ndim != 3 or context.shape[0] != B or context.shape[-1] != c.text_embed_dim:
            raise BadInput(f"context must be (B={B}, L, network.text_embed_dim={c.text_embed_dim}), "
                           f"got {tuple(context.shape)}")
        if context.shape[1] > c.max_text_seq_length:
            raise BadInput(f"context has {context.shape[1]} tokens; network.max_text_seq_length="
                           f"{c.max_text_seq_length}")
        if c.use_learned_positional_embeddings and (H, W, context.shape[1]) != (
                c.sample_height, c.sample_width, c.max_text_seq_length):
            raise BadInput(f"learned positional embeddings need latents {c.sample_height}x{c.sample_width} and "
                           f"{c.max_text_seq_length} text tokens, got {H}x{W} and {context.shape[1]}")

    def positions(self, grid: TokenGrid, device: torch.device, dtype: torch.dtype,
                  sincos: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The fixed positions of a token grid: RoPE (cos, sin), each (L + t·h·w, head_dim) in float32 with
        the identity rotation (cos 1, sin 0) on the L text rows, or the video's sin-cos table (t·h·w, D) in
        `dtype`.

        Built on the CPU (sin-cos in float64, as diffusers does; parity depends on it) and copied to
        `device` once per grid, device and dtype; later forwards reuse the copy with no host work.
        """
        key = (grid, device, dtype) + (("sincos",) if sincos else ())
        T, h, w = grid.video
        if key in self.position_cache:
            return self.position_cache[key]
        c = self.config
        # never an inference tensor: a table first built while sampling under inference_mode must still
        # serve a later training forward (RoPE's backward saves cos and sin)
        with torch.inference_mode(False):
            if c.use_rotary_positional_embeddings and not sincos:  # stays float32: apply_rope rotates in float32
                base_h, base_w = c.sample_height // c.patch_size, c.sample_width // c.patch_size
                cos, sin = rope_3d(c.attention_head_dim, T, h, w, base_h, base_w,
                                   "linspace" if c.patch_size_t is None else "slice")
                identity = cos.new_ones(grid.text, cos.shape[1]), sin.new_zeros(grid.text, sin.shape[1])
                table = tuple(torch.cat([i, r]).to(device) for i, r in zip(identity, (cos, sin)))
            else:
                table = sincos_3d(c.hidden_size, T, h, w, c.spatial_interpolation_scale,
                                  c.temporal_interpolation_scale).to(device=device, dtype=dtype)
        self.position_cache[key] = table
        return table

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                step_idx: int | None = None, ctx: CallContext | None = None) -> torch.Tensor:
        """`ctx.pairs`: the batch's KV-sharing layout for its control. `ctx.expand`: before block
        `expand.layer` the batch becomes `batch[expand.rows]`; the pairs then refer to the expanded rows
        (below that layer there are none), and the output has len(rows) rows."""
        self.check_input(x, context)
        c = self.config
        B = x.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(B)

        emb = self.time_embedding(timestep_embedding(timesteps, c.hidden_size, c.flip_sin_to_cos, c.freq_shift)
                                  .to(x.dtype))
        if self.ofs_embedding is not None:  # CogVideoX1.5-I2V: the constant ofs, as diffusers' pipeline and SAT pass
            ofs = torch.full((1,), OFS, device=x.device)
            emb = emb + self.ofs_embedding(timestep_embedding(ofs, c.ofs_embed_dim, c.flip_sin_to_cos, c.freq_shift)
                                           .to(x.dtype))
        if self.vector_embedding is not None:
            if y is None:
                raise BadInput("network.vector_dim is set, so the network needs vector conditioning y (B, vector_dim)")
            emb = emb + self.vector_embedding(y.to(emb.dtype))

        text, video, grid = self.patch_embed(x, context)  # (B, L, D), (B, t·h·w, D)
        L = grid.text
        rope = None
        if c.use_learned_positional_embeddings and grid.t == c.max_latent_frames:
            # CogVideoX-5B-I2V: the learned [text | video] table and RoPE together
            pos = self.patch_embed.pos_embedding[:, : L + video.shape[1]].to(x.dtype)
            text, video = text + pos[:, :L], video + pos[:, L:]
        elif c.use_learned_positional_embeddings:
            # another frame count: diffusers adds the sin-cos table of that size instead (nothing on the text)
            video = video + self.positions(grid, x.device, x.dtype, sincos=True)
        if c.use_rotary_positional_embeddings:
            rope = self.positions(grid, x.device, x.dtype)
        elif not c.use_learned_positional_embeddings:
            video = video + self.positions(grid, x.device, x.dtype)
        text, video = self.embedding_dropout(text), self.embedding_dropout(video)

        ctx = ctx or CallContext()
        shards = None
        if ctx.group is not None and ctx.group.world_size > 1:  # Ulysses: this process's tokens of both streams
            if torch.is_grad_enabled():
                raise BadInput("sequence parallelism (ulysses) is for sampling: its all-to-all carries no gradients")
            shards = SequenceShards(ctx.group, L, video.shape[1], c.num_attention_heads)
            text, video = shards.shard(text, video=False), shards.shard(video, video=True)
        control, expand = ctx.control, ctx.expand
        scratch: dict = {}  # one forward pass's shared space for the control
        if expand is not None and not 0 <= expand.layer < c.num_layers:
            raise BadInput(f"expand layer {expand.layer} is outside the network's layers 0..{c.num_layers - 1}")
        if expand is not None and expand.layer > 0 and ctx.cache is not None:
            raise BadInput("a step cache cannot run with a call that expands its rows inside the network (multi-"
                           "prompt KV-sharing with reuse=true): their residuals change shape between layers")
        if expand is not None and expand.layer == 0:  # before every block: the rows a step cache sees
            rows = expand.rows.to(x.device)
            video, text, emb = video[rows], text[rows], emb[rows]
            control.on_expand(scratch, rows)

        def run(start: int, stop: int, video: torch.Tensor, text: torch.Tensor):
            nonlocal emb
            for i in range(start, stop):
                block = self.transformer_blocks[i]
                if expand is not None and i == expand.layer > 0:
                    rows = expand.rows.to(x.device)  # no copy when the sampler built it there
                    video, text, emb = video[rows], text[rows], emb[rows]
                    control.on_expand(scratch, rows)
                layer_pairs = ctx.pairs if expand is None or i >= expand.layer else ()
                call = AttentionCall(i, c.num_layers, L, grid.video, step_idx, layer_pairs, scratch, ctx.cache, shards)
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    video, text = checkpoint(block, video, text, emb, rope, control, call, use_reentrant=False)
                else:
                    video, text = block(video, text, emb, rope, control, call)
            return video, text

        # a step cache (vdm.networks.caches) decides which blocks run on this call
        if ctx.cache is None:
            video, text = run(0, c.num_layers, video, text)
        else:
            video, text = ctx.cache.blocks(run, video, text, emb, float(timesteps[0]))
        video = self.proj_out(self.norm_out(self.norm_final(video), emb))  # (B, t·h·w, p·p·C_out)
        if shards is not None:
            video = shards.gather_video(video)
        return self.patch_embed.unpatchify(video, grid)

    # -- checkpoint I/O (diffusers format) ----------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        **overrides) -> DiffusionTransformer:
        """Load a diffusers-format CogVideoX transformer folder (`vdm.networks.diffusers_io.load_transformer`)."""
        return load_transformer(cls, DiTConfig, path, torch_dtype, **overrides)

    def load_checked_state_dict(self, state: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
        """`load_state_dict(strict=True)` with one-line errors naming the key and both shapes."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing:
            raise BadInput(f"{source}: parameter {missing[0]!r} is missing from the checkpoint "
                           f"({len(missing)} missing in all)")
        if unexpected:
            raise BadInput(f"{source}: checkpoint has parameter {unexpected[0]!r} that this network does not "
                           f"({len(unexpected)} unexpected in all); check the network config")
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise BadInput(f"{source}: parameter {k!r} has shape {tuple(v.shape)} in the checkpoint but "
                               f"{tuple(own[k].shape)} in the network")
        self.load_state_dict(state, strict=True, assign=assign)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | None = None,
                        overwrite: bool = False) -> Path:
        """Write a diffusers-loadable folder atomically (`vdm.networks.diffusers_io.save_transformer`)."""
        return save_transformer(self, path, max_shard_size, overwrite)


class FinalAdaLN(nn.Module):
    """Final adaptive LayerNorm: (shift, scale) from the time embedding."""

    def __init__(self, time_dim: int, dim: int, elementwise_affine: bool, eps: float):
        super().__init__()
        self.linear = nn.Linear(time_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(emb))[:, None].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift
