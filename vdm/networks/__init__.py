from vdm.networks.attention_control import CONTROLS, AttentionCall, AttentionControl, make_control
from vdm.networks.dit import DiffusionTransformer, DiTConfig
from vdm.networks.wrapper import NetworkWrapper

__all__ = ["CONTROLS", "AttentionCall", "AttentionControl", "DiTConfig", "DiffusionTransformer",
           "NetworkWrapper", "make_control"]
