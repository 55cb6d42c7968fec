"""Attention control: the seam through which DiTCtrl-style modes change attention without touching weights.

Every DiT block computes q, k, v for the joint sequence `[text | video]` and hands them, with an
`AttentionCall` that says where it is (denoising step, layer index, token layout), to the network's
current control. The control returns the attention output. The plain control is exactly
`scaled_dot_product_attention`; other modes (KV-sharing, mask-guided, reweight, visualisation) are
small subclasses registered by name.

What the sampler wants of one network call travels in a `CallContext` (the control, the batch's sharing
layout, an optional row expansion, and the slots of a step cache and a sequence-parallel group), a frozen
object passed explicitly as `ctx=` from the sampler through the denoiser to the blocks; the network itself
holds no attention state.

Nothing here counts calls: the step index comes from the sampler and the layer index from the block.
Per-forward-pass scratch space (e.g. attention maps accumulated across layers) lives in
`AttentionCall.scratch`, a dict created fresh by every forward pass of the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SharePair:
    """One KV-sharing pair of batch rows: the `target` row may attend with the `source` row's keys and
    values. `mask_source` / `mask_target` are the conditional rows whose attention maps define the
    masks of mask-guided sharing (for an unconditional pair: the matching conditional rows)."""

    source: int
    target: int
    mask_source: int
    mask_target: int


@dataclass(frozen=True)
class AttentionCall:
    """Where one attention call happens. Built by the network, read by controls."""

    layer_idx: int
    num_layers: int
    num_text_tokens: int
    video_grid: tuple[int, int, int]  # (T, H, W) in tokens, after patching
    step_idx: int | None = None  # sampling step (0 = noisiest); None outside sampling
    pairs: tuple[SharePair, ...] = ()  # the batch's sharing layout (rows as seen at this layer)
    scratch: dict = field(default_factory=dict)  # shared by all layers of one forward pass
    cache: Any = None  # the call's step cache (vdm.networks.caches), which may reuse this layer's attention output
    shards: Any = None  # Ulysses: the call's token shards (vdm.networks.sequence_parallel); q, k, v then hold a
    # share of the heads of every token, and controls see the rows of one process


class AttentionControl:
    """The plain mode: full joint self-attention. q, k, v are (B, heads, N, head_dim).

    Subclasses override `__call__`, and `active(step_idx, layer_idx, num_layers)` — whether they change any
    row's output at that step and layer (samplers use it to compute shared work once) — and may
    override `on_expand` when they keep per-row state in `call.scratch`.
    """

    name = "base"
    reads_attention = False  # whether it reads every step's attention weights (a step cache must not skip them)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def active(self, step_idx: int | None, layer_idx: int, num_layers: int | None = None) -> bool:
        """Whether the control changes any output at this step and layer of a `num_layers`-deep network."""
        return False

    def on_expand(self, scratch: dict, rows: torch.Tensor) -> None:
        """The network duplicated batch rows (`new_batch = old_batch[rows]`) mid-forward."""

    def validate(self, num_layers: int, num_steps: int) -> None:
        """Raise a one-line error if the control's windows do not fit the model or the sampler."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(frozen=True)
class Expand:
    """Before block `layer`, the batch becomes `batch[rows]` (rows may repeat): work that several outputs
    share below that layer is computed once. `rows` is a 1-D index tensor on the batch's device."""

    layer: int
    rows: torch.Tensor


@dataclass(frozen=True)
class CallContext:
    """One network call's context: the attention `control`, the batch's KV-sharing `pairs` (rows as seen
    after any expansion) and an optional `expand`; `cache` (a step cache the block loop consults) and
    `group` (the processes a sequence-parallel call shards its tokens over, `vdm.distributed.Processes`) are
    the slots those features fill. The default is a plain, uncached call on one process."""

    control: AttentionControl = field(default_factory=AttentionControl)
    pairs: tuple[SharePair, ...] = ()
    expand: Expand | None = None
    cache: Any = None
    group: Any = None
