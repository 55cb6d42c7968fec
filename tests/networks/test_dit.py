"""DiffusionTransformer behaviour: attention-control seam, checkpointing, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

from vdm.networks import (
    CONTROLS,
    AttentionControl,
    CallContext,
    DiffusionTransformer,
    Expand,
    make_control,
)

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=24,
            text_embed_dim=20, num_layers=3, sample_width=8, sample_height=8, sample_frames=9,
            max_text_seq_length=6)


def perturbed(**overrides) -> DiffusionTransformer:
    torch.manual_seed(0)
    model = DiffusionTransformer(**{**TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def inputs(B=2, T=3, H=8, W=8, L=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, T, 4, H, W, generator=g), torch.tensor([3, 900][:B]), torch.randn(B, L, 20, generator=g)


class RecordingControl(AttentionControl):
    """Plain attention that records (step, layer) and can zero the output of one layer."""

    name = "recording"

    def __init__(self, zero_layer: int | None = None):
        self.seen: list[tuple] = []
        self.zero_layer = zero_layer

    def __call__(self, q, k, v, call):
        self.seen.append((call.step_idx, call.layer_idx, call.num_text_tokens, call.video_grid))
        out = F.scaled_dot_product_attention(q, k, v)
        return torch.zeros_like(out) if call.layer_idx == self.zero_layer else out


def test_control_receives_step_and_layer_and_can_replace_attention():
    model = perturbed()
    x, t, c = inputs()
    control = RecordingControl(zero_layer=1)
    with torch.no_grad():
        plain = model(x, t, c, step_idx=7)
        replaced = model(x, t, c, step_idx=7, ctx=CallContext(control))
    assert control.seen == [(7, i, 6, (3, 4, 4)) for i in range(3)]
    assert not torch.allclose(plain, replaced, atol=1e-4)


def test_controls_travel_per_call_and_the_network_keeps_no_attention_state(monkeypatch):
    monkeypatch.setitem(CONTROLS, "recording", RecordingControl)
    model = perturbed()
    x, t, c = inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = set(vars(model))
    with torch.no_grad():
        before = model(x, t, c)
        changed = model(x, t, c, ctx=CallContext(make_control("recording", zero_layer=0)))
        after = model(x, t, c, ctx=CallContext(make_control("BaseAdaLNMixin")))  # alias of "base"
    assert not torch.allclose(before, changed, atol=1e-4)
    assert torch.equal(before, after)
    assert set(vars(model)) == attributes and not hasattr(model, "control")
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_unknown_control_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown; valid names: base"):
        make_control("nope")


def test_gradient_checkpointing_gives_identical_gradients():
    x, t, c = inputs()
    grads = []
    for flag in (False, True):
        model = perturbed()
        model.gradient_checkpointing = flag
        model.train()
        model(x, t, c).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-6)


def test_vector_conditioning_changes_output_and_is_required():
    model = perturbed(vector_dim=5)
    x, t, c = inputs()
    with torch.no_grad():
        a = model(x, t, c, y=torch.zeros(2, 5))
        b = model(x, t, c, y=torch.ones(2, 5))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="vector conditioning"):
        model(x, t, c)


def test_fresh_model_predicts_zero_and_learns():
    """adaLN-zero init: the untrained network is the zero map; one SGD step moves it toward a target."""
    torch.manual_seed(0)
    model = DiffusionTransformer(**TINY)
    x, t, c = inputs()
    assert torch.equal(model(x, t, c), torch.zeros_like(x))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.randn_like(x)
    losses = []
    for _ in range(30):
        loss = (model(x, t, c) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("hparams, message", [
    (dict(hidden_size=50, num_attention_heads=3), "num_attention_heads=3 does not divide network.hidden_size=50"),
    (dict(sample_height=7), "sample_height=7 is not divisible by patch_size=2"),
    (dict(use_rotary_positional_embeddings=True, attention_head_dim=24), "attention_head_dim=24 must be a multiple of 16"),
    (dict(bogus=1), r"unknown network option\(s\) \['bogus'\]"),
])
def test_bad_config(hparams, message):
    hparams = {**TINY, **hparams}
    if "hidden_size" in hparams:
        hparams.pop("attention_head_dim")
    with pytest.raises(ValueError, match=message):
        DiffusionTransformer(**hparams)


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 4, 7, 8), "latent size 7x8 is not divisible by network.patch_size=2"),
    ((2, 4, 4, 8, 8), r"T x H x W = 4x8x8 exceeds the configured maximum 3x8x8"),
    ((2, 3, 5, 8, 8), "x has 5 channels; network.in_channels=4"),
])
def test_bad_input_shapes(shape, message):
    model = perturbed()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(shape), torch.tensor([1, 2]), torch.randn(2, 6, 20))


def test_from_pretrained_rejects_foreign_folder_and_mismatched_shapes(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        DiffusionTransformer.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        DiffusionTransformer.from_pretrained(tmp_path / "empty")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLCogVideoX"}))
    with pytest.raises(ValueError, match="_class_name is 'AutoencoderKLCogVideoX'; expected 'CogVideoXTransformer3DModel'"):
        DiffusionTransformer.from_pretrained(tmp_path / "vae")

    saved = perturbed().save_pretrained(tmp_path / "ckpt")
    config = json.loads((saved / "config.json").read_text())
    config["text_embed_dim"] = 24  # now the checkpoint's text_proj no longer fits
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'patch_embed.text_proj.weight' has shape \(32, 20\) in the checkpoint "
                                         r"but \(32, 24\) in the network"):
        DiffusionTransformer.from_pretrained(saved)
    with pytest.raises(FileExistsError, match="already exists"):
        perturbed().save_pretrained(saved)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_expanding_rows_mid_network_equals_running_the_expanded_batch(layer):
    model = perturbed()
    x, t, c = inputs()
    rows = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        expanded = model(x, t, c, ctx=CallContext(expand=Expand(layer, rows)))
        direct = model(x[rows], t[rows], c[rows])
    torch.testing.assert_close(expanded, direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expand layer 3 is outside the network's layers 0..2"):
        model(x, t, c, ctx=CallContext(expand=Expand(3, rows)))


def test_head_hidden_dim_adds_a_gelu_layer_that_starts_at_zero_and_is_never_written_for_diffusers(tmp_path):
    plain = DiffusionTransformer(**TINY)
    headed = DiffusionTransformer(**TINY, head_hidden_dim=40)
    assert isinstance(plain.proj_out, torch.nn.Linear)  # CogVideoX's layout is untouched by default
    extra = set(headed.state_dict()) - set(plain.state_dict())
    assert extra == {"proj_out.0.proj.weight", "proj_out.0.proj.bias", "proj_out.1.weight", "proj_out.1.bias"}
    x, t, c = inputs()
    with torch.no_grad():
        assert headed(x, t, c).abs().max() == 0  # the output layer starts at zero, as the linear one does
    with pytest.raises(ValueError, match=r"^network.head_hidden_dim=40 \(a GELU output head, where diffusers has one "
                                         r"linear proj_out\) has no counterpart in diffusers' "
                                         r"CogVideoXTransformer3DModel, which would misread a folder of it"):
        headed.save_pretrained(tmp_path / "headed")
    with pytest.raises(ValueError, match=r"^network.vector_dim=8 \(vector conditioning .*only networks with "
                                         r"head_hidden_dim=0 and vector_dim=null export"):
        DiffusionTransformer(**TINY, vector_dim=8).save_pretrained(tmp_path / "vector")
    assert not list(tmp_path.iterdir())  # nothing written
    config = json.loads((perturbed().save_pretrained(tmp_path / "plain") / "config.json").read_text())
    assert not {"head_hidden_dim", "vector_dim"} & set(config)  # a plain network's folder is diffusers' own
    with pytest.raises(ValueError, match=r"network.head_hidden_dim=-1 must be 0"):
        DiffusionTransformer(**TINY, head_hidden_dim=-1)


def test_head_reaches_every_output_value_where_a_linear_one_cannot():
    """Width 32 < 4 (patch 2x2) x 16 channels = 64 outputs per token: a linear projection's outputs span at most
    32 dimensions; with the GELU head the token outputs span all 64."""
    tiny = {**TINY, "in_channels": 16, "out_channels": 16}
    ranks = {}
    for head in (0, 96):
        torch.manual_seed(0)
        model = DiffusionTransformer(**tiny, head_hidden_dim=head)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
            g = torch.Generator().manual_seed(1)
            out = model(torch.randn(4, 3, 16, 8, 8, generator=g), torch.tensor([3, 200, 500, 900]),
                        torch.randn(4, 6, 20, generator=g))
        tokens = out.reshape(4, 3, 16, 4, 2, 4, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, 64)
        ranks[head] = int(torch.linalg.matrix_rank(tokens - tokens.mean(0), rtol=1e-4))
    assert ranks[0] <= 32 < 60 <= ranks[96]


class DtypeControl(AttentionControl):
    """Plain attention that records the dtype it is handed."""

    name = "dtype"

    def __init__(self):
        self.dtypes: set[torch.dtype] = set()

    def __call__(self, q, k, v, call):
        self.dtypes |= {q.dtype, k.dtype, v.dtype}
        return F.scaled_dot_product_attention(q, k, v)


def test_cpu_attention_runs_in_float32_under_bf16_and_trains_like_it():
    """On the CPU the attention is float32 under bf16 autocast and with bf16 weights (its bf16 backward is slow);
    the network output and the weight gradients stay within bf16 rounding of the float32 network."""
    model = perturbed()
    x, t, c = inputs()
    control = DtypeControl()
    reference = model(x, t, c)
    reference.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x, t, c, ctx=CallContext(control))
    assert control.dtypes == {torch.float32}
    mixed.float().square().mean().backward()
    assert (mixed.float() - reference).abs().max() < 0.05 * reference.abs().max()
    mixed_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    reference_grads = torch.cat([g.flatten() for g in grads.values()])
    assert (mixed_grads - reference_grads).norm() <= 0.05 * reference_grads.norm()
    control.dtypes.clear()
    with torch.no_grad():
        out = model.to(torch.bfloat16)(x.bfloat16(), t, c.bfloat16(), ctx=CallContext(control))
    assert control.dtypes == {torch.float32} and out.dtype == torch.bfloat16
