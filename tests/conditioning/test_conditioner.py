import pytest
import torch
from torch import nn

from vdm.conditioning import GeneralConditioner


class CaptionEmbedder(nn.Module):
    """Toy text embedder: (B, L, D) from the caption length and a learnable table."""

    output_key = "crossattn"

    def __init__(self, dim, input_key="txt", ucg_rate=0.0, ucg_value=None, is_trainable=False, length=3):
        super().__init__()
        self.input_key, self.ucg_rate, self.ucg_value = input_key, ucg_rate, ucg_value
        self.is_trainable = is_trainable
        self.table = nn.Parameter(torch.randn(length, dim))
        self.dropout = nn.Dropout(0.5)
        self.seen = []

    def forward(self, captions):
        self.seen.append(list(captions))
        scale = torch.tensor([len(c) + 1.0 for c in captions]).view(-1, 1, 1)
        return self.dropout(scale * self.table)  # (B, L, D)


class VectorEmbedder(nn.Module):
    output_key = "vector"

    def __init__(self, dim_in, dim_out, input_key="fps", ucg_rate=0.0, is_trainable=True):
        super().__init__()
        self.input_key, self.ucg_rate, self.is_trainable = input_key, ucg_rate, is_trainable
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return self.proj(x) + 10.0  # never zero by accident


BATCH = {"txt": ["a cat", "a dog on a hill", "sky"], "fps": torch.randn(3, 2)}


def make(ucg_rate=0.0, ucg_value=None):
    torch.manual_seed(0)
    first = CaptionEmbedder(4, ucg_rate=ucg_rate, ucg_value=ucg_value)
    second = CaptionEmbedder(6)
    vec_a, vec_b = VectorEmbedder(2, 5), VectorEmbedder(2, 3)
    return GeneralConditioner([first, second, vec_a, vec_b]), (first, second, vec_a, vec_b)


def test_shapes_and_concatenation_order():
    cond, (first, second, vec_a, vec_b) = make()
    out = cond.eval()(BATCH)
    assert set(out) == {"crossattn", "vector"}
    assert out["crossattn"].shape == (3, 3, 10)
    assert out["vector"].shape == (3, 8)
    assert torch.equal(out["crossattn"][..., :4], first(BATCH["txt"]))
    assert torch.equal(out["crossattn"][..., 4:], second(BATCH["txt"]))
    assert torch.allclose(out["vector"][:, 5:], vec_b(BATCH["fps"]))


def test_ucg_rate_one_drops_in_training_only():
    cond, (first, second, *_) = make(ucg_rate=1.0)
    out = cond.train()(BATCH)
    assert torch.all(out["crossattn"][..., :4] == 0)
    assert torch.all(out["crossattn"][..., 4:] != 0)  # the other embedder is untouched
    out = cond.eval()(BATCH)
    assert torch.equal(out["crossattn"][..., :4], first(BATCH["txt"]))


def test_ucg_value_replaces_the_input():
    cond, (first, *_) = make(ucg_rate=1.0, ucg_value="")
    out = cond.train()(BATCH)
    assert first.seen[-1] == ["", "", ""]
    assert torch.equal(out["crossattn"][..., :4], first([""] * 3))


def test_ucg_dropout_is_per_sample_and_seeded():
    cond, _ = make(ucg_rate=0.5)
    cond.train()
    batch = {"txt": ["x"] * 64, "fps": torch.randn(64, 2)}
    a = cond(batch, generator=torch.Generator().manual_seed(3))["crossattn"][..., :4]
    b = cond(batch, generator=torch.Generator().manual_seed(3))["crossattn"][..., :4]
    assert torch.equal(a, b)
    dropped = (a == 0).flatten(1).all(1)
    assert 0 < dropped.sum() < 64
    assert torch.all(a[~dropped] != 0)


def test_force_uc_zero_embeddings_and_no_ucg():
    cond, (first, second, *_) = make(ucg_rate=1.0)
    cond.train()  # ucg must be disabled inside get_unconditional_conditioning even in training mode
    c, uc = cond.get_unconditional_conditioning(BATCH, force_uc_zero_embeddings=["txt"])
    expected = cond.eval()(BATCH)
    for key in expected:
        assert torch.allclose(c[key], expected[key])
    assert torch.all(uc["crossattn"] == 0) and uc["crossattn"].shape == c["crossattn"].shape
    assert torch.allclose(uc["vector"], c["vector"])

    batch_uc = {"txt": [""] * 3, "fps": BATCH["fps"]}
    _, uc = cond.get_unconditional_conditioning(BATCH, batch_uc=batch_uc)
    assert torch.equal(uc["crossattn"][..., :4], first([""] * 3))


def test_frozen_embedders_are_frozen_and_stay_in_eval():
    cond, (first, second, vec_a, _) = make()
    assert not any(p.requires_grad for p in first.parameters())
    assert not any(p.requires_grad for p in second.parameters())
    assert all(p.requires_grad for p in vec_a.parameters())
    cond.train()
    assert not first.training and not first.dropout.training
    assert vec_a.training
    out = cond(BATCH)
    assert out["vector"].requires_grad
    assert not out["crossattn"].requires_grad
    trainable = {n for n, p in cond.named_parameters() if p.requires_grad}
    assert trainable == {
        "embedders.2.proj.weight",
        "embedders.2.proj.bias",
        "embedders.3.proj.weight",
        "embedders.3.proj.bias",
    }


def test_missing_key_names_key_and_keys_present():
    cond, _ = make()
    with pytest.raises(ValueError, match=r"batch has no key 'fps'.*keys present: \['txt'\]"):
        cond({"txt": ["a"]})


def test_bad_embedder_attributes():
    with pytest.raises(
        ValueError, match=r"embedders\[0\] \(CaptionEmbedder\)\.ucg_rate=1.5; must be in \[0, 1\]"
    ):
        GeneralConditioner([CaptionEmbedder(4, ucg_rate=1.5)])
    bad = CaptionEmbedder(4)
    bad.output_key = "context"
    with pytest.raises(ValueError, match="output_key='context'; valid"):
        GeneralConditioner([bad])
    with pytest.raises(ValueError, match="has no attribute 'input_key'"):
        GeneralConditioner([nn.Linear(2, 2)])
