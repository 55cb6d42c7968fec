import pytest
import torch

from vdm.build import compose

# A DiT small enough that a forward pass takes milliseconds on a CPU.
TINY_NETWORK = ["network.num_layers=2", "network.num_attention_heads=2", "network.attention_head_dim=16",
                "network.time_embed_dim=32", "network.head_hidden_dim=64"]


@pytest.fixture
def tiny_cfg():
    def make(*overrides: str):
        return compose(TINY_NETWORK + ["sampler.verbose=false", *overrides])
    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
