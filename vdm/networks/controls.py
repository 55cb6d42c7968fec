"""The registry of attention controls by name (reference DiTCtrl / SAT mixin names are aliases)."""

from __future__ import annotations

from vdm.errors import BadInput
from vdm.networks.attention_control import AttentionControl
from vdm.networks.kv_sharing import KVSharing, MaskGuidedKVSharing
from vdm.networks.reweight import Reweight
from vdm.networks.visualize import VisualizeAttention

CONTROLS: dict[str, type[AttentionControl]] = {
    "base": AttentionControl,
    "BaseAdaLNMixin": AttentionControl,
    "kv_sharing": KVSharing,
    "KVSharingAdaLNMixin": KVSharing,
    "kv_sharing_mask_guided": MaskGuidedKVSharing,
    "KVSharingMaskGuidedAdaLNMixin": MaskGuidedKVSharing,
    "reweight": Reweight,
    "ReWeightAdaLNMixin": Reweight,
    "visualize": VisualizeAttention,
}


def make_control(name: str, **kwargs) -> AttentionControl:
    """Build a control by name; `kwargs` are the mode's options (windows, thresholds, ...)."""
    if name not in CONTROLS:
        raise BadInput(f"attention control {name!r} is unknown; valid names: {', '.join(CONTROLS)}")
    return CONTROLS[name](**kwargs)
