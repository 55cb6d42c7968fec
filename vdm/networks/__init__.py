from vdm.networks.attention_control import (
           AttentionCall,
           AttentionControl,
           CallContext,
           Expand,
           SharePair,
)
from vdm.networks.controls import CONTROLS, make_control
from vdm.networks.dit import DiffusionTransformer, DiTConfig
from vdm.networks.wrapper import NetworkWrapper

__all__ = ["CONTROLS", "AttentionCall", "CallContext", "AttentionControl", "Expand", "DiTConfig", "DiffusionTransformer",
           "NetworkWrapper", "SharePair", "make_control"]
