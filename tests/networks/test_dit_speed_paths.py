"""DiT speed paths: cached position tables, a low-precision network behind a float32 sampler, torch.compile."""

import copy

import pytest
import torch

import vdm.networks.dit as dit
from tests.networks.test_dit import RecordingControl, inputs, perturbed
from vdm.build import build_engine
from vdm.networks import CallContext, DiffusionTransformer, NetworkWrapper, SharePair
from vdm.networks.kv_sharing import KVSharing, MaskGuidedKVSharing

POSITIONS = {"sincos": {}, "rope": dict(use_rotary_positional_embeddings=True)}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def count_table_builds(monkeypatch) -> list[str]:
    """Record every sincos_3d / rope_3d call the network makes."""
    built: list[str] = []
    for name in ("sincos_3d", "rope_3d"):
        original = getattr(dit, name)
        monkeypatch.setattr(dit, name, lambda *a, _f=original, _n=name: built.append(_n) or _f(*a))
    return built


@pytest.mark.parametrize("kind", POSITIONS)
def test_cached_positions_equal_a_fresh_build(kind):
    model = perturbed(**POSITIONS[kind])
    x, t, c = inputs()
    c_ = model.config
    with torch.no_grad():
        first = model(x, t, c)
        second = model(x, t, c)  # from the cache
    assert torch.equal(first, second)
    grid = dit.TokenGrid(c.shape[1], 3, 4, 4)
    cached = model.positions(grid, x.device, x.dtype)
    if kind == "rope":  # the text rows first: the identity rotation
        fresh = dit.rope_3d(c_.attention_head_dim, 3, 4, 4, c_.sample_height // 2, c_.sample_width // 2)
        L = c.shape[1]
        assert all(torch.equal(a[L:], b) for a, b in zip(cached, fresh))
        assert torch.equal(cached[0][:L], torch.ones_like(cached[0][:L])) and not cached[1][:L].any()
    else:
        fresh = dit.sincos_3d(c_.hidden_size, 3, 4, 4, c_.spatial_interpolation_scale,
                              c_.temporal_interpolation_scale)
        assert torch.equal(cached, fresh)
    half = model.positions(grid, x.device, torch.bfloat16)
    if kind == "sincos":  # float64 -> float32 -> bfloat16, as the uncached path cast it
        assert half.dtype == torch.bfloat16 and torch.equal(half, fresh.to(torch.bfloat16))


@pytest.mark.parametrize("kind", POSITIONS)
def test_second_forward_builds_no_position_table(kind, monkeypatch):
    model = perturbed(**POSITIONS[kind])
    built = count_table_builds(monkeypatch)
    x, t, c = inputs()
    with torch.no_grad():
        model(x, t, c)
        model(x, t, c)
        assert len(built) == 1
        model(x[:, :2], t, c)  # a new grid is a new table
        model(x[:, :2], t, c)
        assert len(built) == 2
        copy.deepcopy(model)(x, t, c)  # the copy carries the cache
    assert len(built) == 2
    L = c.shape[1]
    assert set(model.position_cache) == {(dit.TokenGrid(L, 3, 4, 4), x.device, x.dtype),
                                         (dit.TokenGrid(L, 2, 4, 4), x.device, x.dtype)}


def test_position_cache_is_not_state_and_survives_dtype_change_and_meta_init(tmp_path):
    model = perturbed()
    x, t, c = inputs()
    keys = set(model.state_dict())
    with torch.no_grad():
        expected = model(x, t, c)
        assert set(model.state_dict()) == keys

        reloaded = DiffusionTransformer.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))  # meta init
        assert torch.equal(reloaded(x, t, c), expected)

        wide = copy.deepcopy(model).to(torch.float64)  # a float64 table now, next to the float32 one
        fresh = copy.deepcopy(wide)
        fresh.position_cache.clear()
        torch.testing.assert_close(wide(x.double(), t, c.double()), fresh(x.double(), t, c.double()), rtol=0, atol=0)
        assert len(wide.position_cache) == 2


def test_table_cached_while_sampling_under_inference_mode_serves_training():
    model = perturbed(**POSITIONS["rope"]).train()
    x, t, c = inputs()
    with torch.inference_mode():
        model(x, t, c)
    model(x, t, c).square().mean().backward()  # RoPE's backward saves the cached cos and sin
    assert model.patch_embed.proj.weight.grad is not None


def test_bf16_network_serves_a_float32_sampler():
    """x_t, concat, context and y are cast to the network's dtype; the output comes back in x_t's."""
    net = perturbed(in_channels=6, vector_dim=5)
    x, t, c = inputs()
    cond = {"crossattn": c, "concat": torch.randn(2, 3, 2, 8, 8), "vector": torch.randn(2, 5)}
    with torch.no_grad():
        full = NetworkWrapper(net)(x, t, cond)
        half = NetworkWrapper(copy.deepcopy(net).to(torch.bfloat16))(x, t, cond)
    assert full.dtype == half.dtype == torch.float32
    assert relative_error(half, full) < 5e-2


def test_float32_network_gets_its_inputs_uncopied():
    net = perturbed(vector_dim=5)
    seen = {}
    net.register_forward_pre_hook(lambda module, args, kwargs: seen.update(x=args[0], **kwargs), with_kwargs=True)
    x, t, c = inputs()
    y = torch.randn(2, 5)
    with torch.no_grad():
        out = NetworkWrapper(net)(x, t, {"crossattn": c, "vector": y})
        assert torch.equal(out, net(x, t, c, y=y))
    assert seen["x"] is x and seen["context"] is c and seen["y"] is y


def test_compiled_engine_names_each_parameter_once(tiny_cfg):
    eager, compiled = build_engine(tiny_cfg()), build_engine(tiny_cfg("compile_model=true"))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert all(k.startswith(("model.diffusion_model.", "denoiser.", "conditioner.", "first_stage_model."))
               for k in compiled.state_dict())


@pytest.mark.slow  # ~28 s of cold compiling; sample.py's compiled path keeps its test (test_pretrained_modes.py)
def test_compiled_network_matches_eager_and_still_saves(tmp_path):
    """Inductor on CPU (needs a C compiler): the control object, passed as an argument, runs inside."""
    net = perturbed(num_layers=1)
    x, t, c = inputs()
    eager_control, compiled_control = RecordingControl(), RecordingControl()
    with torch.no_grad():
        expected = NetworkWrapper(net)(x, t, {"crossattn": c}, step_idx=4, ctx=CallContext(eager_control))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled = NetworkWrapper(copy.deepcopy(net), compile_model=True)
        out = compiled(x, t, {"crossattn": c}, step_idx=4, ctx=CallContext(compiled_control))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # dynamo did trace it
    assert relative_error(out, expected) <= 1e-4
    assert compiled_control.seen == eager_control.seen == [(4, 0, 6, (3, 4, 4))]
    saved = compiled.diffusion_model.save_pretrained(tmp_path / "ckpt")
    reloaded = DiffusionTransformer.from_pretrained(saved)
    assert reloaded.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in reloaded.state_dict().items())


@pytest.mark.parametrize("make", [lambda: KVSharing(start_step=1, end_step=4, start_layer=1),
                                  # the same compiled path as the window above, with its steps listed (make test-slow)
                                  pytest.param(lambda: KVSharing(step_idx=[1, 3], start_layer=1),
                                               marks=pytest.mark.slow),
                                  # a compiled mask-guided window: ~40 s of cold compiling (make test-slow)
                                  pytest.param(lambda: MaskGuidedKVSharing(ref_token_idx=[0], cur_token_idx=[1],
                                                                           start_step=1, end_step=4, start_layer=1),
                                               marks=pytest.mark.slow)],
                         ids=["kv_sharing", "kv_sharing_step_list", "kv_sharing_mask_guided"])
def test_compiled_network_runs_controls_over_changing_steps_like_eager(make):
    """The sampler passes a new step index every call; after two, dynamo makes it symbolic, so a control's
    window test must not need a constant (`in range(...)` did, and compiled multi-prompt sampling died)."""
    net = perturbed(num_layers=2)
    compiled = copy.deepcopy(net)
    compiled.compile()
    (x, _, c), t = inputs(B=4), torch.full((4,), 500)
    pairs = (SharePair(0, 1, 2, 3), SharePair(2, 3, 2, 3))
    with torch.no_grad():
        for step in range(5):
            expected = net(x, t, c, step_idx=step, ctx=CallContext(make(), pairs))
            out = compiled(x, t, c, step_idx=step, ctx=CallContext(make(), pairs))
            assert relative_error(out, expected) <= 1e-4, step
            if step in (1, 3):  # a window step: the targets differ from plain attention
                plain = net(x, t, c, step_idx=step)
                assert relative_error(out[[1, 3]], plain[[1, 3]]) > 1e-3
