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

from vdm.networks.attention_control import AttentionCall, AttentionControl, SharePair
from vdm.networks.visualize import save_frames, video_text_maps

REFERENCE_START_LAYER, REFERENCE_NUM_LAYERS = 25, 30  # DiTCtrl shares K/V in layers 25..30 of 30


def default_start_layer(num_layers: int) -> int:
    """The reference window's first layer scaled to `num_layers` (at least the last layer stays in)."""
    return min(round(REFERENCE_START_LAYER * num_layers / REFERENCE_NUM_LAYERS), num_layers - 1)


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
            raise ValueError(f"step window start_step={self.start_step}, end_step={self.end_step} is empty; "
                             "need 0 <= start_step < end_step")
        if self.start_layer is not None and self.start_layer < 0:
            raise ValueError(f"start_layer={self.start_layer} is negative; valid: 0..num_layers-1 or None")
        if self.end_layer is not None and self.end_layer < 1:
            raise ValueError(f"end_layer={self.end_layer} is below 1; valid: 1..num_layers or None")
        if None not in (self.start_layer, self.end_layer) and self.end_layer <= self.start_layer:
            raise ValueError(f"end_layer={self.end_layer} must be above start_layer={self.start_layer}")

    def steps(self) -> Sequence[int]:
        return self.step_idx if self.step_idx is not None else range(self.start_step, self.end_step)

    def first_layer(self, num_layers: int | None) -> int:
        if self.start_layer is not None:
            return self.start_layer
        if num_layers is None:
            raise ValueError("start_layer=None scales the reference window to the network's depth; "
                             "pass num_layers to active() or set start_layer")
        return default_start_layer(num_layers)

    def layers(self, num_layers: int) -> Sequence[int]:
        if self.layer_idx is not None:
            return self.layer_idx
        return range(self.first_layer(num_layers), self.end_layer if self.end_layer is not None else num_layers)

    def active(self, step_idx: int | None, layer_idx: int, num_layers: int | None = None) -> bool:
        if step_idx is None or step_idx not in self.steps():
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
                raise ValueError(f"layer_idx={bad} is outside {layers} (valid 0..{num_layers - 1})")
        else:
            if self.start_layer is not None and not self.start_layer < num_layers:
                raise ValueError(f"start_layer={self.start_layer} is outside {layers} (valid 0..{num_layers - 1})")
            if self.end_layer is not None and not self.end_layer <= num_layers:
                raise ValueError(f"end_layer={self.end_layer} is outside {layers} (valid 1..{num_layers})")
            if self.end_layer is not None and self.first_layer(num_layers) >= self.end_layer:
                raise ValueError(f"end_layer={self.end_layer} must be above start_layer="
                                 f"{self.first_layer(num_layers)} (the default for {num_layers} layers)")
        if self.step_idx is not None:
            bad = [s for s in self.step_idx if not 0 <= s < num_steps]
            if bad:
                raise ValueError(f"step_idx={bad} is outside {steps} (valid 0..{num_steps - 1})")
        else:
            if not self.start_step < num_steps:
                raise ValueError(f"start_step={self.start_step} is outside {steps} (valid 0..{num_steps - 1})")
            if not self.end_step <= num_steps:
                raise ValueError(f"end_step={self.end_step} is outside {steps} (valid 1..{num_steps})")


def as_token_idx(option: str, token_idx: int | Sequence[int]) -> tuple[int, ...]:
    """An int or a list of text-token indices as a tuple (Hydra lists included)."""
    idx = (int(token_idx),) if isinstance(token_idx, int) else tuple(int(j) for j in token_idx)
    if not idx:
        raise ValueError(f"{option} is empty; name at least one text token (valid 0..L_text-1)")
    return idx


def check_token_idx(option: str, token_idx: tuple[int, ...], num_text_tokens: int) -> None:
    if not all(0 <= j < num_text_tokens for j in token_idx):
        raise ValueError(f"{option}={list(token_idx)} is outside the {num_text_tokens} text tokens "
                         f"(valid 0..{num_text_tokens - 1})")


def source_rows(batch: int, pairs: Sequence[SharePair], device: torch.device) -> torch.Tensor:
    """(batch,) row whose K/V each row uses: its pair's source for a target, itself otherwise."""
    rows = list(range(batch))
    targets = [p.target for p in pairs]
    if len(set(targets)) != len(targets):
        raise ValueError(f"pairs name a target row twice ({targets}); each target needs exactly one source")
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
    """KV-sharing whose target splits into foreground and background by attention-derived masks.

    Every layer of a sampling pass adds each row's head-averaged video->text map (B, N_video, L_text)
    to a running sum in `call.scratch` (only while a later window layer of this pass can use it).
    In a window layer with no maps yet: plain KV-sharing. Otherwise, from the mean map so far and per
    pair: the source mask (row `mask_source`, summed over `ref_token_idx`) and target mask (row
    `mask_target`, over `cur_token_idx`), each min-max normalised per latent frame and binarised at
    `thres`. The target's queries attend to the source's K/V twice, with the source's video keys
    outside its mask blocked (foreground) and inside it blocked (background), text keys never; each
    target token takes the foreground result where the target mask is 1 (text tokens: at
    `cur_token_idx`), else the background one.

    Memory: the maps are built one row and one query block at a time (`video_text_maps`): at most about
    2·heads·block·N float32 with heads·block·N <= LOGITS_BUDGET, plus one row's k in float32. The running
    sum is B·N_video·L_text float32. The masked attentions use a per-key mask (P, 1, 1, N), so no
    (N, N) mask and no full attention matrix is ever built here.
    """

    name = "kv_sharing_mask_guided"
    SUM, COUNT = "mask_guided.map_sum", "mask_guided.map_count"

    def __init__(self, ref_token_idx: int | Sequence[int], cur_token_idx: int | Sequence[int], thres: float = 0.1,
                 start_step: int = 2, end_step: int = 25, start_layer: int | None = None,
                 end_layer: int | None = None, step_idx: Sequence[int] | None = None,
                 layer_idx: Sequence[int] | None = None, save_masks_dir: str | Path | None = None):
        super().__init__(start_step, end_step, start_layer, end_layer, step_idx, layer_idx)
        self.ref_token_idx = as_token_idx("ref_token_idx", ref_token_idx)
        self.cur_token_idx = as_token_idx("cur_token_idx", cur_token_idx)
        if not 0.0 <= thres <= 1.0:
            raise ValueError(f"thres={thres} is outside 0..1 (the masks are min-max normalised)")
        self.thres = float(thres)
        self.save_masks_dir = None if save_masks_dir is None else Path(save_masks_dir)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        check_token_idx("ref_token_idx", self.ref_token_idx, call.num_text_tokens)
        check_token_idx("cur_token_idx", self.cur_token_idx, call.num_text_tokens)
        if not call.pairs or not self.active(call.step_idx, call.layer_idx, call.num_layers):
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.SUM not in call.scratch:
            src = source_rows(q.shape[0], call.pairs, q.device)
            out = F.scaled_dot_product_attention(q, k[src], v[src])
        else:
            out = self.masked_sharing(q, k, v, call, call.scratch[self.SUM] / call.scratch[self.COUNT])
        if self.maps_needed_later(call):
            self.accumulate(q, k, call)
        return out

    def maps_needed_later(self, call: AttentionCall) -> bool:
        """Whether a later layer of this pass is a window layer (the maps serve nothing else)."""
        return (call.step_idx is not None and call.step_idx in self.window.steps()
                and any(i > call.layer_idx for i in self.window.layers(call.num_layers)))

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

    def mask(self, maps: torch.Tensor, token_idx: tuple[int, ...], call: AttentionCall) -> torch.Tensor:
        """(P, N_video, L) mean maps -> (P, N_video) binary mask: summed over `token_idx`, min-max
        normalised per latent frame, >= thres."""
        T, H, W = call.video_grid
        m = maps[..., list(token_idx)].sum(-1).view(-1, T, H * W)
        low, high = m.amin(-1, keepdim=True), m.amax(-1, keepdim=True)
        return ((m - low) / (high - low + 1e-6) >= self.thres).view(m.shape[0], T * H * W)

    def masked_sharing(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                       mean_maps: torch.Tensor) -> torch.Tensor:
        pairs, L, device = call.pairs, call.num_text_tokens, q.device
        source_rows(q.shape[0], pairs, device)  # rejects a target named twice
        targets = torch.tensor([p.target for p in pairs], device=device)
        sources = torch.tensor([p.source for p in pairs], device=device)
        source_mask = self.mask(mean_maps[[p.mask_source for p in pairs]], self.ref_token_idx, call)  # (P, N_video)
        target_mask = self.mask(mean_maps[[p.mask_target for p in pairs]], self.cur_token_idx, call)
        if self.save_masks_dir is not None:
            self.save_masks(source_mask, target_mask, call)

        out = torch.empty_like(q)
        others = torch.ones(q.shape[0], dtype=torch.bool, device=device)
        others[targets] = False
        if others.any():
            out[others] = F.scaled_dot_product_attention(q[others], k[others], v[others])

        q_t, k_s, v_s = q[targets], k[sources], v[sources]
        text_keys = torch.ones(len(pairs), L, dtype=torch.bool, device=device)
        keep_fg = torch.cat([text_keys, source_mask], dim=1)[:, None, None, :]  # (P, 1, 1, N): per key
        keep_bg = torch.cat([text_keys, ~source_mask], dim=1)[:, None, None, :]
        foreground = F.scaled_dot_product_attention(q_t, k_s, v_s, attn_mask=keep_fg)
        background = F.scaled_dot_product_attention(q_t, k_s, v_s, attn_mask=keep_bg)
        text_fg = torch.zeros(L, dtype=torch.bool, device=device)
        text_fg[list(self.cur_token_idx)] = True
        take_fg = torch.cat([text_fg.expand(len(pairs), L), target_mask], dim=1)[:, None, :, None]  # (P, 1, N, 1)
        out[targets] = torch.where(take_fg, foreground, background)
        return out

    def save_masks(self, source_mask: torch.Tensor, target_mask: torch.Tensor, call: AttentionCall) -> None:
        T, H, W = call.video_grid
        prefix = f"step{call.step_idx:03d}_layer{call.layer_idx:02d}"
        for i in range(source_mask.shape[0]):
            for role, mask in (("source", source_mask[i]), ("target", target_mask[i])):
                save_frames(self.save_masks_dir / f"{prefix}_pair{i}_{role}.png", mask.view(T, H, W).float(),
                            normalise=False)

    def __repr__(self) -> str:
        return (f"MaskGuidedKVSharing(ref_token_idx={list(self.ref_token_idx)}, cur_token_idx="
                f"{list(self.cur_token_idx)}, thres={self.thres}, {self.window})")
