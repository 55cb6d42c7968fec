"""KV-sharing (DiTCtrl, SPEC §5): in a window of denoising steps and layers, the target row of every
`SharePair` attends with its own queries to its source row's keys and values.

- `Window`: the steps and layers where a control acts (ranges or explicit lists; the default layer
  range is the reference's layers 25..30 of 30, scaled to the network's depth).
- `KVSharing`: plain KV-sharing, one attention call on K/V gathered by row.
- `MaskGuidedKVSharing`: KV-sharing split into foreground / background by masks taken from the
  video->text attention maps accumulated over the layers of the current forward pass.

Controls keep no state between calls: per-pass state lives in `AttentionCall.scratch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vdm.errors import BadInput
from vdm.networks.attention_control import AttentionCall, AttentionControl, SharePair
from vdm.networks.visualize import frame_strip, min_max, pass_dir, save_png, video_text_maps

REFERENCE_START_LAYER, REFERENCE_NUM_LAYERS = 25, 30  # DiTCtrl shares K/V in layers 25..30 of 30
REFERENCE_START_STEP, REFERENCE_END_STEP, REFERENCE_NUM_STEPS = 2, 25, 50  # ... in steps 2..25 of 50


def default_start_layer(num_layers: int) -> int:
    """The reference window's first layer scaled to `num_layers` (at least the last layer stays in)."""
    return min(round(REFERENCE_START_LAYER * num_layers / REFERENCE_NUM_LAYERS), num_layers - 1)


def default_step_window(num_steps: int) -> tuple[int, int]:
    """The reference window's steps [2, 25) of 50 scaled to `num_steps` (at least one step stays in): (2, 25)
    at 50 steps, (0, 4) at 8, (4, 50) at 100."""
    start = min(round(REFERENCE_START_STEP * num_steps / REFERENCE_NUM_STEPS), num_steps - 1)
    return start, max(round(REFERENCE_END_STEP * num_steps / REFERENCE_NUM_STEPS), start + 1)


@dataclass(frozen=True)
class Window:
    """Steps [start_step, end_step) and layers [start_layer, end_layer); explicit `step_idx` / `layer_idx`
    lists replace the matching range. start_layer=None: `default_start_layer(num_layers)`;
    end_layer=None: through the last layer. A step index of None (outside sampling) is never inside."""

    start_step: int = 2
    end_step: int = 25
    start_layer: int | None = None
    end_layer: int | None = None
    step_idx: tuple[int, ...] | None = None
    layer_idx: tuple[int, ...] | None = None

    def __post_init__(self):
        for option in ("step_idx", "layer_idx"):
            if getattr(self, option) is not None:
                object.__setattr__(self, option, tuple(int(i) for i in getattr(self, option)))
        if self.step_idx is None and not 0 <= self.start_step < self.end_step:
            raise BadInput(f"step window start_step={self.start_step}, end_step={self.end_step} is empty; "
                           "need 0 <= start_step < end_step")
        if self.start_layer is not None and self.start_layer < 0:
            raise BadInput(f"start_layer={self.start_layer} is negative; valid: 0..num_layers-1 or None")
        if self.end_layer is not None and self.end_layer < 1:
            raise BadInput(f"end_layer={self.end_layer} is below 1; valid: 1..num_layers or None")
        if None not in (self.start_layer, self.end_layer) and self.end_layer <= self.start_layer:
            raise BadInput(f"end_layer={self.end_layer} must be above start_layer={self.start_layer}")

    def first_layer(self, num_layers: int | None) -> int:
        if self.start_layer is not None:
            return self.start_layer
        if num_layers is None:
            raise BadInput("start_layer=None scales the reference window to the network's depth; "
                           "pass num_layers to active() or set start_layer")
        return default_start_layer(num_layers)

    def layers(self, num_layers: int) -> Sequence[int]:
        if self.layer_idx is not None:
            return self.layer_idx
        return range(self.first_layer(num_layers), self.end_layer if self.end_layer is not None else num_layers)

    def has_step(self, step_idx: int | None) -> bool:
        """Whether the window holds sampling step `step_idx`. Bounds and equalities, not `in range(...)`:
        under torch.compile the step index may be symbolic, and a range cannot test a symbolic member."""
        if step_idx is None:
            return False
        if self.step_idx is not None:
            return any(step_idx == i for i in self.step_idx)
        return self.start_step <= step_idx < self.end_step

    def active(self, step_idx: int | None, layer_idx: int, num_layers: int | None = None) -> bool:
        if not self.has_step(step_idx):
            return False
        if self.layer_idx is not None:
            return layer_idx in self.layer_idx
        # end_layer=None needs no depth: every layer index is below num_layers
        return self.first_layer(num_layers) <= layer_idx and (self.end_layer is None or layer_idx < self.end_layer)

    def validate(self, num_layers: int, num_steps: int) -> None:
        layers, steps = f"the network's {num_layers} layers", f"the sampler's {num_steps} steps"
        if self.layer_idx is not None:
            bad = [i for i in self.layer_idx if not 0 <= i < num_layers]
            if bad:
                raise BadInput(f"layer_idx={bad} is outside {layers} (valid 0..{num_layers - 1})")
        else:
            if self.start_layer is not None and not self.start_layer < num_layers:
                raise BadInput(f"start_layer={self.start_layer} is outside {layers} (valid 0..{num_layers - 1})")
            if self.end_layer is not None and not self.end_layer <= num_layers:
                raise BadInput(f"end_layer={self.end_layer} is outside {layers} (valid 1..{num_layers})")
            if self.end_layer is not None and self.first_layer(num_layers) >= self.end_layer:
                raise BadInput(f"end_layer={self.end_layer} must be above start_layer="
                               f"{self.first_layer(num_layers)} (the default for {num_layers} layers)")
        if self.step_idx is not None:
            bad = [s for s in self.step_idx if not 0 <= s < num_steps]
            if bad:
                raise BadInput(f"step_idx={bad} is outside {steps} (valid 0..{num_steps - 1})")
        else:
            if not self.start_step < num_steps:
                raise BadInput(f"start_step={self.start_step} is outside {steps} (valid 0..{num_steps - 1})")
            if not self.end_step <= num_steps:
                raise BadInput(f"end_step={self.end_step} is outside {steps} (valid 1..{num_steps})")


def as_token_idx(option: str, token_idx: int | Sequence[int]) -> tuple[int, ...]:
    """An int or a list of text-token indices as a tuple (Hydra lists included)."""
    idx = (int(token_idx),) if isinstance(token_idx, int) else tuple(int(j) for j in token_idx)
    if not idx:
        raise BadInput(f"{option} is empty; name at least one text token (valid 0..L_text-1)")
    return idx


def check_token_idx(option: str, token_idx: tuple[int, ...], num_text_tokens: int) -> None:
    if not all(0 <= j < num_text_tokens for j in token_idx):
        raise BadInput(f"{option}={list(token_idx)} is outside the {num_text_tokens} text tokens "
                       f"(valid 0..{num_text_tokens - 1})")


def source_rows(batch: int, pairs: Sequence[SharePair], device: torch.device) -> torch.Tensor:
    """(batch,) row whose K/V each row uses: its pair's source for a target, itself otherwise."""
    rows = list(range(batch))
    targets = [p.target for p in pairs]
    if len(set(targets)) != len(targets):
        raise BadInput(f"pairs name a target row twice ({targets}); each target needs exactly one source")
    for pair in pairs:
        rows[pair.target] = pair.source
    return torch.tensor(rows, device=device)


class WindowedControl(AttentionControl):
    """A control that changes outputs only inside a `Window`. `active` takes the network depth as an
    optional third argument, needed only when the window's first layer is the depth-scaled default."""

    def __init__(self, start_step: int = 2, end_step: int = 25, start_layer: int | None = None,
                 end_layer: int | None = None, step_idx: Sequence[int] | None = None,
                 layer_idx: Sequence[int] | None = None):
        self.window = Window(start_step, end_step, start_layer, end_layer, step_idx, layer_idx)

    def active(self, step_idx: int | None, layer_idx: int, num_layers: int | None = None) -> bool:
        return self.window.active(step_idx, layer_idx, num_layers)

    def validate(self, num_layers: int, num_steps: int) -> None:
        self.window.validate(num_layers, num_steps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.window})"


class KVSharing(WindowedControl):
    """In the window, each pair's target row attends to its source row's K/V (the whole sequence, text
    included); every other row, and every row outside the window, gets plain attention. One attention
    call on K/V gathered by row; extra memory: one copy of k and v."""

    name = "kv_sharing"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if not call.pairs or not self.active(call.step_idx, call.layer_idx, call.num_layers):
            return F.scaled_dot_product_attention(q, k, v)
        src = source_rows(q.shape[0], call.pairs, q.device)
        return F.scaled_dot_product_attention(q, k[src], v[src])


class MaskGuidedKVSharing(KVSharing):
    """KV-sharing whose target splits into foreground and background by attention-derived masks (SPEC §5).

    Every layer of a sampling pass FIRST adds each row's head-averaged video->text map (B, N_video,
    L_text) to a running sum in `call.scratch`; a window layer then uses the mean = sum / count, which
    includes its own maps. (Layers after the pass's last window layer, and steps outside the window,
    skip the sum: nothing would read it, and it is reset with every forward pass.) Per pair, from the
    mean: the source mask (row `mask_source`, summed over `ref_token_idx`) and the target mask (row
    `mask_target`, over `cur_token_idx`), each min-max normalised per latent frame (+1e-6) and
    binarised at `thres`. The target's VIDEO queries attend to the source's K/V twice, once seeing
    every text key and the source's video keys inside its mask (foreground), once every text key and
    the video keys outside it (background), and each takes the foreground result where the target mask
    is 1, else the background one. Text queries are never masked: both their results are plain
    attention to the source's K/V, so the rule "foreground at `cur_token_idx`, background elsewhere"
    gives that attention for every text row.

    `save_masks_dir`: the continuous normalised maps (before binarising) as PNGs, the latent frames side
    by side, in `save_masks_dir/step{s}_pass{n}/layer{l}_pair{i}_{source|target}.png` (see `pass_dir`).

    Memory: the maps are built one row and one query block at a time (`video_text_maps`): at most about
    2·heads·block·N float32 with heads·block·N <= LOGITS_BUDGET, plus one row's k in float32. The running
    sum is B·N_video·L_text float32. The masked attentions use a per-key mask (P, 1, 1, N) on the video
    queries only, so no (N, N) mask and no full attention matrix is ever built here.
    """

    name = "kv_sharing_mask_guided"
    reads_attention = True  # its masks come from the attention to the chosen tokens
    SUM, COUNT, DIR = "mask_guided.map_sum", "mask_guided.map_count", "mask_guided.dir"

    def __init__(self, ref_token_idx: int | Sequence[int], cur_token_idx: int | Sequence[int], thres: float = 0.3,
                 start_step: int = 2, end_step: int = 25, start_layer: int | None = None,
                 end_layer: int | None = None, step_idx: Sequence[int] | None = None,
                 layer_idx: Sequence[int] | None = None, save_masks_dir: str | Path | None = None):
        super().__init__(start_step, end_step, start_layer, end_layer, step_idx, layer_idx)
        self.ref_token_idx = as_token_idx("ref_token_idx", ref_token_idx)
        self.cur_token_idx = as_token_idx("cur_token_idx", cur_token_idx)
        if not 0.0 <= thres <= 1.0:
            raise BadInput(f"thres={thres} is outside 0..1 (the masks are min-max normalised)")
        self.thres = float(thres)
        self.save_masks_dir = None if save_masks_dir is None else Path(save_masks_dir)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        check_token_idx("ref_token_idx", self.ref_token_idx, call.num_text_tokens)
        check_token_idx("cur_token_idx", self.cur_token_idx, call.num_text_tokens)
        if self.maps_needed(call):
            self.accumulate(q, k, call)
        if not call.pairs or not self.active(call.step_idx, call.layer_idx, call.num_layers):
            return F.scaled_dot_product_attention(q, k, v)
        # a window layer always needs the maps, so the sum holds this layer's at least
        return self.masked_sharing(q, k, v, call, call.scratch[self.SUM] / call.scratch[self.COUNT])

    def maps_needed(self, call: AttentionCall) -> bool:
        """Whether this layer or a later one of the pass is a window layer (the maps serve nothing else)."""
        return (self.window.has_step(call.step_idx)
                and max(self.window.layers(call.num_layers), default=-1) >= call.layer_idx)

    def accumulate(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall) -> None:
        maps = video_text_maps(q, k, call.num_text_tokens)
        if self.SUM in call.scratch:
            call.scratch[self.SUM].add_(maps)
            call.scratch[self.COUNT] += 1
        else:
            call.scratch[self.SUM], call.scratch[self.COUNT] = maps, 1

    def on_expand(self, scratch: dict, rows: torch.Tensor) -> None:
        if self.SUM in scratch:
            scratch[self.SUM] = scratch[self.SUM][rows.to(scratch[self.SUM].device)]

    @staticmethod
    def normalised_map(maps: torch.Tensor, token_idx: tuple[int, ...], call: AttentionCall) -> torch.Tensor:
        """(P, N_video, L) mean maps -> (P, T, H·W): summed over `token_idx`, min-max normalised per
        latent frame (+1e-6 in the denominator), as the reference does before binarising."""
        T, H, W = call.video_grid
        return min_max(maps[..., list(token_idx)].sum(-1).view(-1, T, H * W), dims=(2,))

    def masked_sharing(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                       mean_maps: torch.Tensor) -> torch.Tensor:
        pairs, L, device = call.pairs, call.num_text_tokens, q.device
        source_rows(q.shape[0], pairs, device)  # rejects a target named twice
        targets = torch.tensor([p.target for p in pairs], device=device)
        sources = torch.tensor([p.source for p in pairs], device=device)
        source_map = self.normalised_map(mean_maps[[p.mask_source for p in pairs]], self.ref_token_idx, call)
        target_map = self.normalised_map(mean_maps[[p.mask_target for p in pairs]], self.cur_token_idx, call)
        if self.save_masks_dir is not None:
            self.save_maps(source_map, target_map, call)
        source_mask = (source_map >= self.thres).flatten(1)  # (P, N_video)
        target_mask = (target_map >= self.thres).flatten(1)

        out = torch.empty_like(q)
        others = torch.ones(q.shape[0], dtype=torch.bool, device=device)
        others[targets] = False
        if others.any():
            out[others] = F.scaled_dot_product_attention(q[others], k[others], v[others])

        q_t, k_s, v_s = q[targets], k[sources], v[sources]
        # text queries: unmasked, so foreground = background = plain attention to the source's K/V
        text_out = F.scaled_dot_product_attention(q_t[:, :, :L], k_s, v_s)
        text_keys = torch.ones(len(pairs), L, dtype=torch.bool, device=device)
        keep_fg = torch.cat([text_keys, source_mask], dim=1)[:, None, None, :]  # (P, 1, 1, N): per key
        keep_bg = torch.cat([text_keys, ~source_mask], dim=1)[:, None, None, :]
        q_video = q_t[:, :, L:]
        foreground = F.scaled_dot_product_attention(q_video, k_s, v_s, attn_mask=keep_fg)
        background = F.scaled_dot_product_attention(q_video, k_s, v_s, attn_mask=keep_bg)
        video_out = torch.where(target_mask[:, None, :, None], foreground, background)  # (P, heads, N_video, d)
        out[targets] = torch.cat([text_out, video_out], dim=2)
        return out

    def save_maps(self, source_map: torch.Tensor, target_map: torch.Tensor, call: AttentionCall) -> None:
        """The continuous normalised maps (P, T, H·W) of every pair as PNG strips of the latent frames."""
        T, H, W = call.video_grid
        folder = pass_dir(self.save_masks_dir, call.step_idx, call.scratch, self.DIR)
        for i in range(source_map.shape[0]):
            for role, m in (("source", source_map[i]), ("target", target_map[i])):
                save_png(folder / f"layer{call.layer_idx:02d}_pair{i}_{role}.png", frame_strip(m.view(T, H, W)))

    def __repr__(self) -> str:
        return (f"MaskGuidedKVSharing(ref_token_idx={list(self.ref_token_idx)}, cur_token_idx="
                f"{list(self.cur_token_idx)}, thres={self.thres}, {self.window})")
