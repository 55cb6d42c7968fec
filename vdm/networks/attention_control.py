"""Attention control: the seam through which DiTCtrl-style modes change attention without touching weights.

Every DiT block computes q, k, v for the joint sequence `[text | video]` and hands them, with an
`AttentionCall` that says where it is (denoising step, layer index, token layout), to the network's
current control. The control returns the attention output. The plain control is exactly
`scaled_dot_product_attention`; other modes (KV-sharing, mask-guided, reweight, visualisation) are
small subclasses registered by name.

Nothing here counts calls: the step index comes from the sampler and the layer index from the block.
Per-forward-pass scratch space (e.g. attention maps accumulated across layers) lives in
`AttentionCall.scratch`, a dict created fresh by every forward pass of the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionCall:
    """Where one attention call happens. Built by the network, read by controls."""

    layer_idx: int
    num_layers: int
    num_text_tokens: int
    video_grid: tuple[int, int, int]  # (T, H, W) in tokens, after patching
    step_idx: int | None = None  # sampling step (0 = noisiest); None outside sampling
    scratch: dict = field(default_factory=dict)  # shared by all layers of one forward pass


class AttentionControl:
    """The plain mode: full joint self-attention. q, k, v are (B, heads, N, head_dim)."""

    name = "base"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# Control names -> classes. Reference (DiTCtrl / SAT) mixin names are accepted as aliases.
CONTROLS: dict[str, type[AttentionControl]] = {
    "base": AttentionControl,
    "BaseAdaLNMixin": AttentionControl,
}


def make_control(name: str, **kwargs) -> AttentionControl:
    """Build a control by name; `kwargs` are the mode's options (windows, thresholds, ...)."""
    if name not in CONTROLS:
        raise ValueError(f"attention control {name!r} is unknown; valid names: {', '.join(CONTROLS)}")
    return CONTROLS[name](**kwargs)
