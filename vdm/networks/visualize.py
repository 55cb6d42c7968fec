"""Attention maps computed exactly in query blocks, saved as greyscale PNGs, and a control
(`VisualizeAttention`) that writes the reference's maps at chosen steps and layers without changing
any output.

Every map here is a head-averaged softmax(q kᵀ/√d) probability. The softmax runs over ALL keys, so each
query needs its whole row of logits; the maps are therefore computed one batch row and one block of
queries at a time (heads·block·N <= LOGITS_BUDGET), and only the columns a map needs are kept. The
full (N, N) attention matrix is never built.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from vdm.atomic import atomic_path
from vdm.errors import BadInput
from vdm.networks.attention_control import AttentionCall, AttentionControl

log = logging.getLogger(__name__)

# Largest block of float32 logits (heads x queries x keys) held at once by the chunked computations.
LOGITS_BUDGET = 2**26  # elements: 256 MiB

# The reference's inference.yaml: attention maps at these sampling steps and layers.
REFERENCE_MAP_STEPS = (4, 14, 24, 34, 44, 49)
REFERENCE_MAP_LAYERS = (4, 14, 24, 29)


def query_block(heads: int, num_keys: int) -> int:
    """Queries per block so that one row's (heads, block, keys) logits stay within LOGITS_BUDGET."""
    return max(1, LOGITS_BUDGET // (heads * num_keys))


def logit_blocks(q: torch.Tensor, k: torch.Tensor, first_query: int = 0,
                 block: int | None = None) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(row, first query, logits (heads, blk, N), logsumexp (heads, blk, 1)) in float32 for the queries
    first_query..N-1 of every batch row, one block at a time. exp(logits - lse) is the softmax."""
    B, heads, N, d = q.shape
    block = block or query_block(heads, N)
    for b in range(B):
        k_b = k[b].float()  # (heads, N, d)
        for start in range(first_query, N, block):
            logits = torch.matmul(q[b, :, start:start + block].float(), k_b.transpose(-1, -2)) / math.sqrt(d)
            yield b, start, logits, torch.logsumexp(logits, dim=-1, keepdim=True)


@torch.no_grad()
def video_text_maps(q: torch.Tensor, k: torch.Tensor, num_text_tokens: int, block: int | None = None) -> torch.Tensor:
    """Head-averaged video->text attention probabilities, (B, N_video, L_text) in float32.

    q, k: (B, heads, N, d) with tokens `[text | video]`. Exact: each query block's logits against all
    keys give its log-normaliser; only the text columns are exponentiated and kept. Peak extra memory
    per block: about 2·heads·block·N float32 (logits and logsumexp's work space) plus one row's k in
    float32 (heads·N·d).
    """
    B, _, N, _ = q.shape
    L = num_text_tokens
    maps = q.new_empty(B, N - L, L, dtype=torch.float32)
    for b, start, logits, lse in logit_blocks(q, k, L, block):
        maps[b, start - L:start - L + logits.shape[1]] = (logits[..., :L] - lse).exp().mean(0)
    return maps


def block_probs(logits: torch.Tensor, lse: torch.Tensor, rows: slice | list[int],
                cols: slice | list[int]) -> torch.Tensor:
    """Head-averaged softmax probabilities of a block's query `rows` at key `cols`: (rows, cols)."""
    return (logits[:, rows][..., cols] - lse[:, rows]).exp().mean(0)


@dataclass
class AttentionMaps:
    """Head-averaged attention probabilities of one layer, per batch row, float32. Frames and positions
    are in latent tokens: `frames[i]` is a latent frame, `positions[i]` an (h, w) token position."""

    video_text: torch.Tensor  # (B, N_video, L): every video query -> every text key
    text_text: torch.Tensor  # (B, L, L): text query -> text key
    spatial: torch.Tensor  # (B, len(frames), H·W, H·W): queries and keys both in latent frame frames[i]
    temporal: torch.Tensor  # (B, len(positions), T, T): queries and keys both at token position positions[i]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@torch.no_grad()
def attention_maps(q: torch.Tensor, k: torch.Tensor, num_text_tokens: int, video_grid: tuple[int, int, int],
                   frames: Sequence[int] = (), positions: Sequence[tuple[int, int]] = (),
                   block: int | None = None) -> AttentionMaps:
    """The maps of `AttentionMaps` from q, k (B, heads, N, d), tokens `[text | video (t h w)]`.

    One pass over query blocks (`logit_blocks`): only the columns each map needs are exponentiated, so
    the peak extra memory is that of `video_text_maps`, and the result is B·(N_video·L + L² +
    len(frames)·(H·W)² + len(positions)·T²) float32.
    """
    B, _, N, _ = q.shape
    L, (T, H, W) = num_text_tokens, video_grid
    HW = H * W
    maps = AttentionMaps(video_text=q.new_zeros(B, N - L, L, dtype=torch.float32),
                         text_text=q.new_zeros(B, L, L, dtype=torch.float32),
                         spatial=q.new_zeros(B, len(frames), HW, HW, dtype=torch.float32),
                         temporal=q.new_zeros(B, len(positions), T, T, dtype=torch.float32))
    for b, start, logits, lse in logit_blocks(q, k, 0, block):
        stop = start + logits.shape[1]
        to_text = block_probs(logits, lse, slice(None), slice(0, L))  # (blk, L)
        if start < L:
            maps.text_text[b, start:min(stop, L)] = to_text[:L - start]
        if stop > L:
            first = max(start, L)
            maps.video_text[b, first - L:stop - L] = to_text[first - start:]
        for i, f in enumerate(frames):
            lo, hi = L + f * HW, L + (f + 1) * HW
            if start < hi and stop > lo:  # queries of frame f in this block -> keys of frame f
                first, last = max(start, lo), min(stop, hi)
                maps.spatial[b, i, first - lo:last - lo] = block_probs(logits, lse, slice(first - start, last - start),
                                                                       slice(lo, hi))
        for i, (h, w) in enumerate(positions):
            tokens = [L + t * HW + h * W + w for t in range(T)]  # the token at (h, w) in every frame
            here = [t for t, token in enumerate(tokens) if start <= token < stop]
            if here:  # queries at (h, w) in this block -> keys at (h, w)
                maps.temporal[b, i, here] = block_probs(logits, lse, [tokens[t] - start for t in here], tokens)
    return maps


# -- images -------------------------------------------------------------------------------------------

def min_max(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The reference's normalisation: (x - min) / (max - min + 1e-6) over `dims`."""
    low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return (x - low) / (high - low + 1e-6)


def frame_strip(frames: torch.Tensor) -> torch.Tensor:
    """(T, H, W) -> (H, T·W): the frames side by side."""
    return rearrange(frames, "t h w -> h (t w)")


def save_png(path: str | Path, image: torch.Tensor) -> None:
    """Write an (h, w) image with values in [0, 1] as an 8-bit greyscale PNG (round(255·x)), atomically:
    a reader never sees a half-written file."""
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG")


def pass_dir(root: Path, step_idx: int | None, scratch: dict, key: str) -> Path:
    """This forward pass's image folder, `root/step{s}_pass{n}` with the first n not yet taken.

    A sampling step may run several forward passes (one per pair of segments in a multi-prompt video),
    and an output folder may be reused: claiming the folder by creating it keeps every pass's files
    apart. The choice is kept in `scratch` (under `key`) for the pass's other layers.
    """
    if key not in scratch:
        root.mkdir(parents=True, exist_ok=True)
        step = "none" if step_idx is None else f"{step_idx:03d}"
        n = 0
        while True:
            folder = root / f"step{step}_pass{n}"
            try:
                folder.mkdir()
                break
            except FileExistsError:
                n += 1
        scratch[key] = folder
    return scratch[key]


# -- the control --------------------------------------------------------------------------------------

REFERENCE_TOKENS = 6  # VisualizeAdaLNMixin draws the video->text maps of the first six text tokens


class VisualizeAttention(AttentionControl):
    """Plain attention; at steps `attn_map_step_idx` and layers `attn_map_layer_idx`, save the reference's
    (VisualizeAdaLNMixin) attention maps of every batch row. The output is never changed.

    Each map is the mean over the layers 0..l of the current forward pass (the reference sums every
    layer's head-averaged probabilities and resets after the last layer), then min-max normalised with
    +1e-6 in the denominator. Per row b, in `out_dir/step{s}_pass{n}/` (see `pass_dir`):
    - `layer{l}_row{b}_video_text_token{j}.png` (or `_tokens{i}-{j}-...` for a summed group): the
      video->text map of text token j (`token_idx=None`: tokens 0..5 each, as the reference; an int or list: their sum),
      normalised per latent frame over its H×W tokens, the latent frames side by side: (H, T·W).
    - `layer{l}_row{b}_text_text.png`: (L, L), text query rows, text key columns.
    - `layer{l}_row{b}_spatial_frame{f}.png`: (H·W, H·W), queries and keys of latent frame f, each
      flattened h·W + w (`frame_idx`, default the middle frame T // 2).
    - `layer{l}_row{b}_temporal_h{h}_w{w}.png`: (T, T), query frame rows, key frame columns, the token
      at (h, w) in every frame (`positions`, default the centre (H // 2, W // 2)).

    `step_idx` / `layer_idx` are aliases of `attn_map_step_idx` / `attn_map_layer_idx`, used only when
    those are not given (see `alias`).

    Memory: at a chosen step, layers 0..max(attn_map_layer_idx) each compute their maps in query blocks
    (`attention_maps`) and add them to a running sum in `call.scratch` of the size of one `AttentionMaps`.
    """

    name = "visualize"
    reads_attention = True
    SUM, COUNT, DIR = "visualize.map_sum", "visualize.map_count", "visualize.dir"

    def __init__(self, out_dir: str | Path, attn_map_step_idx: Sequence[int] | None = None,
                 attn_map_layer_idx: Sequence[int] | None = None, token_idx: int | Sequence[int] | None = None,
                 frame_idx: int | Sequence[int] | None = None, positions: Sequence[Sequence[int]] | None = None,
                 step_idx: Sequence[int] | None = None, layer_idx: Sequence[int] | None = None):
        self.out_dir = Path(out_dir)
        self.steps = alias("attn_map_step_idx", attn_map_step_idx, "step_idx", step_idx, REFERENCE_MAP_STEPS)
        self.layers = alias("attn_map_layer_idx", attn_map_layer_idx, "layer_idx", layer_idx, REFERENCE_MAP_LAYERS)
        self.token_idx = as_indices(token_idx)
        if self.token_idx == ():
            raise BadInput("token_idx is empty; give text token indices, or None for one image each of tokens 0..5")
        self.frame_idx = as_indices(frame_idx)
        if positions is not None:
            positions = tuple(tuple(int(i) for i in p) for p in positions)
            if not all(len(p) == 2 for p in positions):
                raise BadInput(f"positions={[list(p) for p in positions]} must be (h, w) token pairs")
        self.positions = positions

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if call.step_idx in self.steps and call.layer_idx <= max(self.layers):
            self.check(call)
            self.accumulate(q, k, call)
            if call.layer_idx in self.layers:
                self.save(call)
        return F.scaled_dot_product_attention(q, k, v)

    def frames_and_positions(self, video_grid: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
        T, H, W = video_grid
        frames = self.frame_idx if self.frame_idx is not None else (T // 2,)
        positions = self.positions if self.positions is not None else ((H // 2, W // 2),)
        return frames, positions

    def check(self, call: AttentionCall) -> None:
        L, (T, H, W) = call.num_text_tokens, call.video_grid
        if self.token_idx is not None and not all(0 <= j < L for j in self.token_idx):
            raise BadInput(f"token_idx={list(self.token_idx)} is outside the {L} text tokens (valid 0..{L - 1})")
        frames, positions = self.frames_and_positions(call.video_grid)
        if not all(0 <= f < T for f in frames):
            raise BadInput(f"frame_idx={list(frames)} is outside the {T} latent frames (valid 0..{T - 1})")
        if not all(0 <= h < H and 0 <= w < W for h, w in positions):
            raise BadInput(f"positions={[list(p) for p in positions]} is outside the {H}x{W} token grid "
                           f"(valid h 0..{H - 1}, w 0..{W - 1})")

    def accumulate(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall) -> None:
        frames, positions = self.frames_and_positions(call.video_grid)
        maps = attention_maps(q, k, call.num_text_tokens, call.video_grid, frames, positions)
        if self.SUM in call.scratch:
            for name, total in call.scratch[self.SUM].tensors().items():
                total.add_(getattr(maps, name))
            call.scratch[self.COUNT] += 1
        else:
            call.scratch[self.SUM], call.scratch[self.COUNT] = maps, 1

    def on_expand(self, scratch: dict, rows: torch.Tensor) -> None:
        if self.SUM in scratch:
            total = scratch[self.SUM]
            scratch[self.SUM] = AttentionMaps(**{name: t[rows.to(t.device)] for name, t in total.tensors().items()})

    def images(self, call: AttentionCall) -> Iterator[tuple[str, torch.Tensor]]:
        """(file name, normalised (h, w) image) of every map to save at this layer: the layer mean so far."""
        T, H, W = call.video_grid
        count, total = call.scratch[self.COUNT], call.scratch[self.SUM]
        mean = AttentionMaps(**{name: t / count for name, t in total.tensors().items()})
        frames, positions = self.frames_and_positions(call.video_grid)
        video_text = rearrange(mean.video_text, "b (t h w) l -> b l t h w", t=T, h=H, w=W)
        first = range(min(REFERENCE_TOKENS, call.num_text_tokens))  # the reference draws tokens 0..5
        groups = ([(f"token{j:03d}", [j]) for j in first] if self.token_idx is None
                  else [("tokens" + "-".join(str(j) for j in self.token_idx), list(self.token_idx))])
        layer = f"layer{call.layer_idx:02d}"
        for b in range(video_text.shape[0]):
            for label, tokens in groups:
                per_frame = min_max(video_text[b, tokens].sum(0), dims=(1, 2))
                yield f"{layer}_row{b}_video_text_{label}.png", frame_strip(per_frame)
            yield f"{layer}_row{b}_text_text.png", min_max(mean.text_text[b], dims=(0, 1))
            for i, f in enumerate(frames):
                yield f"{layer}_row{b}_spatial_frame{f:02d}.png", min_max(mean.spatial[b, i], dims=(0, 1))
            for i, (h, w) in enumerate(positions):
                yield f"{layer}_row{b}_temporal_h{h:02d}_w{w:02d}.png", min_max(mean.temporal[b, i], dims=(0, 1))

    def save(self, call: AttentionCall) -> None:
        folder = pass_dir(self.out_dir, call.step_idx, call.scratch, self.DIR)
        for name, image in self.images(call):
            save_png(folder / name, image)
        log.debug("saved attention maps of step %s layer %s to %s", call.step_idx, call.layer_idx, folder)

    def validate(self, num_layers: int, num_steps: int) -> None:
        bad_layers = [i for i in self.layers if not 0 <= i < num_layers]
        if bad_layers:
            raise BadInput(f"attn_map_layer_idx={bad_layers} is outside the network's {num_layers} layers "
                           f"(valid 0..{num_layers - 1})")
        bad_steps = [s for s in self.steps if not 0 <= s < num_steps]
        if bad_steps:
            raise BadInput(f"attn_map_step_idx={bad_steps} is outside the sampler's {num_steps} steps "
                           f"(valid 0..{num_steps - 1})")

    def __repr__(self) -> str:
        return (f"VisualizeAttention(out_dir={str(self.out_dir)!r}, attn_map_step_idx={list(self.steps)}, "
                f"attn_map_layer_idx={list(self.layers)}, token_idx={self.token_idx and list(self.token_idx)}, "
                f"frame_idx={self.frame_idx and list(self.frame_idx)}, positions={self.positions})")


def as_indices(idx: int | Sequence[int] | None) -> tuple[int, ...] | None:
    """None, an int or a list (Hydra lists included) as a tuple of ints."""
    if idx is None:
        return None
    return (int(idx),) if isinstance(idx, int) else tuple(int(i) for i in idx)


def alias(option: str, value: Sequence[int] | None, alias_name: str, alias_value: Sequence[int] | None,
          default: tuple[int, ...]) -> tuple[int, ...]:
    """`option`, else its alias, else the default. With both set the option wins: the alias names are the
    reference's KV-sharing window keys, which its visualisation mixin also takes and ignores, and one
    sampling job hands the same `control_options.*` to every control it builds."""
    if value is not None and alias_value is not None:
        log.info("VisualizeAttention: %s=%s is set, so %s=%s is read as a KV-sharing window option and ignored",
                 option, list(value), alias_name, list(alias_value))
    chosen = value if value is not None else alias_value
    indices = default if chosen is None else as_indices(chosen)
    if not indices:
        raise BadInput(f"{option} is empty; name at least one index")
    return indices
