"""LoRA adapters on the DiT's attention projections (peft), and their state dict."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model

from vdm.errors import BadInput

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(network: nn.Module, rank: int = 64, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters in place. `lora_B` starts at zero, so the network's output is unchanged."""
    if rank < 1:
        raise BadInput(f"lora.rank={rank} must be >= 1")
    names = {name for name, _ in network.named_modules()}
    for target in target_modules:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise BadInput(f"lora.target_modules entry {target!r} matches no module of the network "
                           f"(CogVideoX attention uses {', '.join(DEFAULT_TARGETS)})")
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=list(target_modules))
    return inject_adapter_in_model(config, network)


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if "lora_" in k}
