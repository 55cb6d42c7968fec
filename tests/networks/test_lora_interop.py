"""LoRA adapters move between vdm and diffusers' CogVideoX loader with the same outputs both ways, for 1.0
text-to-video and the family (5B-I2V and 1.5-I2V through CogVideoXImageToVideoPipeline, 1.5 through
CogVideoXPipeline)."""

import json

import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline
from omegaconf import OmegaConf, open_dict
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.cogvideox_folder import make_cogvideox_folder
from tests.networks.test_dit_parity import CONFIGS, FAMILY, reference_forward, reference_model, relative_error
from tests.sampling.test_family_cli import PROMPT, SCALE, SEED, STEPS, compare, pipeline_outputs, write_image
from vdm.build import compose
from vdm.networks import DiffusionTransformer
from vdm.networks.lora import DEFAULT_TARGETS, add_lora, lora_state_dict
from vdm.networks.lora_interop import (
    METADATA_KEY,
    WEIGHT_NAME,
    from_diffusers_lora,
    load_diffusers_lora,
    main,
    save_diffusers_lora,
    to_diffusers_lora,
)
from vdm.pretrained import engine_config, read_folder
from vdm.runs import write_run_config
from vdm.sampling import sample

CONFIG = CONFIGS["rope_5b_like"]
RANK, ALPHA = 4, 7.0  # alpha != rank: a lost or doubled scale shows


# 1.0 T2V (5B-like), and the family: 5B-I2V (image latents on the channels, learned positions), 1.5 T2V (2-frame
# tokens) and 1.5-I2V (+ the ofs embedding)
NETWORKS = {"rope_5b_like": CONFIG, **FAMILY}


def inputs(config=CONFIG, seed=1):
    """Latents as the pipelines give the transformer: image-to-video ones are [noisy video | image latent on the
    first frame, zeros after] on the channels; 1.5's frame count is a multiple of its 2-frame tokens."""
    g = torch.Generator().manual_seed(seed)
    T, C = (4 if config.get("patch_size_t") else 3), config["out_channels"]
    x = torch.randn(2, T, C, 6, 8, generator=g)
    if config["in_channels"] == 2 * C:
        image = torch.cat([torch.randn(2, 1, C, 6, 8, generator=g), torch.zeros(2, T - 1, C, 6, 8)], dim=1)
        x = torch.cat([x, image], dim=2)
    assert x.shape[2] == config["in_channels"]
    context = torch.randn(2, config["max_text_seq_length"], config["text_embed_dim"], generator=g)
    return x, torch.tensor([17, 803]), context


def randomize_lora(module, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(params=list(NETWORKS))
def base(tmp_path, request):
    """A diffusers transformer (1.0 5B-like, or one of the family's) and its folder, from which vdm's network loads
    the same base weights."""
    ref = reference_model(NETWORKS[request.param])
    ref.save_pretrained(tmp_path / "base" / "transformer")
    return ref, tmp_path / "base"


def pipeline_class(transformer):
    """The pipeline that loads the model's LoRA: CogVideoXImageToVideoPipeline for 5B-I2V and 1.5-I2V."""
    c = transformer.config
    return CogVideoXImageToVideoPipeline if c.in_channels == 2 * c.out_channels else CogVideoXPipeline


def pipeline(transformer):
    return pipeline_class(transformer)(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                       scheduler=None)


def vdm_lora_network(folder):
    ours = DiffusionTransformer.from_pretrained(folder).eval()
    add_lora(ours, rank=RANK, alpha=ALPHA, target_modules=DEFAULT_TARGETS)
    randomize_lora(ours)
    return ours


def fake_run(tmp_path, state, rank=RANK, alpha=ALPHA, network=None):
    """A LoRA run folder as vdm.training writes it: config.yaml and checkpoints/step-N/{model,ema}.safetensors."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"lora_train": True, "lora": {"rank": rank, "alpha": alpha,
                                     "target_modules": list(DEFAULT_TARGETS)}, "network": network or {}}),
                   run / "config.yaml")
    save_file({k: v.contiguous() for k, v in state.items()}, step / "model.safetensors")
    save_file({**{k: v.contiguous() * 2 for k, v in state.items()}, "__num_updates__": torch.tensor(3)},
              step / "ema.safetensors")
    return step


def test_vdm_lora_loads_in_diffusers_pipeline(tmp_path, base):
    ref, folder = base
    ours = vdm_lora_network(folder)
    x, t, context = inputs(ref.config)
    with torch.no_grad():
        before = reference_forward(ref, x, t, context)
        got = ours(x, t, context)
    assert relative_error(got, before) > 1e-2  # the adapters change the output

    step = fake_run(tmp_path, lora_state_dict(ours))
    file = save_diffusers_lora(step, tmp_path / "export")
    assert file == tmp_path / "export" / WEIGHT_NAME
    assert not list(file.parent.glob("*.tmp"))
    pipe = pipeline(ref)
    pipe.load_lora_weights(tmp_path / "export")
    with torch.no_grad():
        expected = reference_forward(pipe.transformer, x, t, context)
    err = relative_error(got, expected)
    print(f"vdm -> diffusers {type(pipe).__name__} LoRA: max abs error {(got - expected).abs().max():.2e}, "
          f"max relative error {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_diffusers_lora_loads_in_vdm(tmp_path, base, use_rslora):
    """A LoRA saved by diffusers' pipeline (the model's own: I2V's for the I2V models) and by the transformer."""
    ref, folder = base
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        use_rslora=use_rslora)
    ref.add_adapter(config)
    randomize_lora(ref, seed=5)
    pipeline_class(ref).save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(ref),
                                          transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict())
    ref.save_lora_adapter(tmp_path / "adapter")  # the transformer-level format: no `transformer.` prefix

    x, t, context = inputs(ref.config)
    with torch.no_grad():
        expected = reference_forward(ref, x, t, context)
        plain = DiffusionTransformer.from_pretrained(folder).eval()(x, t, context)
    assert relative_error(plain, expected) > 1e-2  # the adapters change the output
    for source in (tmp_path / "lora", tmp_path / "adapter" / WEIGHT_NAME):
        ours = load_diffusers_lora(DiffusionTransformer.from_pretrained(folder).eval(), source)
        scale = ALPHA / RANK**0.5 if use_rslora else ALPHA / RANK  # rsLoRA: alpha/sqrt(r)
        assert ours.transformer_blocks[0].attn1.to_q.scaling["default"] == pytest.approx(scale)
        with torch.no_grad():
            got = ours(x, t, context)
        err = relative_error(got, expected)
        print(f"diffusers -> vdm {'rsLoRA' if use_rslora else 'LoRA'} ({source.name}): max abs error "
              f"{(got - expected).abs().max():.2e}, max relative error {err:.2e}")
        assert err < 1e-5


@pytest.mark.parametrize("variant, route", [("5b_i2v", "lora="), ("15_i2v", "run")])
def test_a_diffusers_lora_samples_image_to_video_as_the_pipeline_does(tmp_path, variant, route):
    """A diffusers LoRA over an image-to-video folder samples the video CogVideoXImageToVideoPipeline samples with
    that LoRA loaded: given to sample.py as `pretrained=<folder> lora=<file>`, or imported (the `import` command) as
    the weights of a LoRA run whose config.yaml records the folder (`checkpoint=<run>`), as training writes one."""
    folder = make_cogvideox_folder(tmp_path / variant, variant)
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(folder)
    ref = pipe.transformer
    ref.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(DEFAULT_TARGETS)))
    randomize_lora(ref, seed=5)
    CogVideoXImageToVideoPipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(ref),
        transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict())
    ref.delete_adapters("default")

    if route == "run":
        step = tmp_path / "run" / "checkpoints" / "step-1"
        main(["import", str(tmp_path / "lora"), str(step / "model.safetensors")])
        with safe_open(step / "model.safetensors", framework="pt") as f:
            meta = f.metadata()
        cfg = engine_config(read_folder(folder))
        with open_dict(cfg):
            cfg.lora_train = True
            cfg.lora = {"rank": int(meta["lora.rank"]), "alpha": float(meta["lora.alpha"]),
                        "target_modules": json.loads(meta["lora.target_modules"]), "dropout": 0.0}
        write_run_config(cfg, tmp_path / "run")
        (step / "state.json").write_text(json.dumps({"step": 1, "data_position": 0, "lora": True}))
        source = [f"checkpoint={tmp_path / 'run'}"]
    else:
        source = [f"pretrained={folder}", f"lora={tmp_path / 'lora'}"]

    image = write_image(tmp_path / "first.png", (32, 24))
    out = tmp_path / "out"
    sample(compose([*source, f"image={image}", f"prompts=[{PROMPT}]", "sampler=ddim",
                    "guider=cfg", f"cfg={SCALE}", f"steps={STEPS}", f"seed={SEED}", "rescale=full",
                    "save_latents=true", f"output_dir={out}", "sampler.verbose=false"], config_name="sample"))
    row = json.loads((out / "samples.jsonl").read_text())
    assert (row["source"], row.get("lora")) == ((str(step), None) if route == "run" else
                                                (str(folder), str(tmp_path / "lora")))
    rgb = Image.open(image).convert("RGB")
    plain, _ = pipeline_outputs(pipe, False, image=rgb)
    pipe.load_lora_weights(tmp_path / "lora")
    latents, frames = pipeline_outputs(pipe, False, image=rgb)
    assert relative_error(latents, plain) > 1e-2  # the LoRA changes the video
    compare(out, latents, frames, f"{variant} with a diffusers LoRA ({route})")
    if route == "run":  # a LoRA run carries adapters already
        with pytest.raises(ValueError, match="the network already has LoRA adapters"):
            sample(compose([*source, f"lora={tmp_path / 'lora'}", f"image={image}", "prompts=x",
                            f"output_dir={tmp_path / 'twice'}"], config_name="sample"))
        assert not (tmp_path / "twice").exists()


def test_round_trip_and_metadata(tmp_path):
    torch.manual_seed(0)
    net = DiffusionTransformer(**CONFIG)
    add_lora(net, rank=RANK, alpha=ALPHA)
    randomize_lora(net)
    state = lora_state_dict(net)
    tensors, metadata = to_diffusers_lora(state, RANK, ALPHA)
    assert "transformer.transformer_blocks.0.attn1.to_out.0.lora_A.weight" in tensors
    assert metadata["transformer.r"] == RANK and metadata["transformer.lora_alpha"] == ALPHA
    assert len(metadata["transformer.target_modules"]) == 4 * CONFIG["num_layers"]

    file = save_diffusers_lora(state, tmp_path / "x.safetensors", alpha=ALPHA)
    with safe_open(file, framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY]) == metadata
    back, rank, alpha = from_diffusers_lora(file)
    assert (rank, alpha) == (RANK, ALPHA)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_partial_adapter_loads_only_its_modules(tmp_path):
    """Adapters on some blocks only: the loader targets exactly those modules (full paths), not every to_q."""
    torch.manual_seed(0)
    net = DiffusionTransformer(**CONFIG)
    add_lora(net, rank=RANK, alpha=ALPHA)
    randomize_lora(net)
    state = {k: v for k, v in lora_state_dict(net).items() if k.startswith("transformer_blocks.0.")}
    save_diffusers_lora(state, tmp_path, alpha=ALPHA)
    ours = load_diffusers_lora(DiffusionTransformer(**CONFIG), tmp_path)
    loaded = lora_state_dict(ours)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_cli_export_and_import(tmp_path):
    torch.manual_seed(0)
    net = DiffusionTransformer(**CONFIG)
    add_lora(net, rank=RANK, alpha=ALPHA)
    randomize_lora(net)
    state = lora_state_dict(net)
    step = fake_run(tmp_path, state)
    main(["export", str(step), str(tmp_path / "out"), "--ema"])
    main(["import", str(tmp_path / "out"), str(tmp_path / "back.safetensors")])
    back = load_file(tmp_path / "back.safetensors")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k] * 2) for k in state)  # the EMA copy
    with safe_open(tmp_path / "back.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert (meta["lora.rank"], float(meta["lora.alpha"])) == ("4", ALPHA)
    assert json.loads(meta["lora.target_modules"]) == sorted(DEFAULT_TARGETS)


def test_export_errors(tmp_path):
    torch.manual_seed(0)
    net = DiffusionTransformer(**CONFIG)
    add_lora(net, rank=RANK, alpha=ALPHA)
    state = lora_state_dict(net)
    step = fake_run(tmp_path, state)
    with pytest.raises(ValueError, match=r"^alpha=2.0 disagrees with lora.alpha=7.0 in .*config.yaml$"):
        save_diffusers_lora(step, tmp_path / "out", alpha=2.0)
    with pytest.raises(ValueError, match="alpha is required"):
        save_diffusers_lora(state, tmp_path / "out")
    with pytest.raises(ValueError, match=r"key 'transformer_blocks.0.norm1.linear.weight' is not a LoRA weight"):
        to_diffusers_lora({**state, "transformer_blocks.0.norm1.linear.weight": torch.zeros(2, 2)}, RANK, ALPHA)
    with pytest.raises(ValueError, match="rank=8 but the adapter weights have rank 4"):
        to_diffusers_lora(state, 8, ALPHA)


def test_export_of_a_network_with_vdm_only_parts_is_refused(tmp_path, capsys):
    """The synthetic default's GELU head (network.head_hidden_dim=256): diffusers would load the base with a
    random proj_out, so the adapter is refused in one line naming the option, and nothing is written."""
    torch.manual_seed(0)
    net = DiffusionTransformer(**CONFIG)
    add_lora(net, rank=RANK, alpha=ALPHA)
    step = fake_run(tmp_path, lora_state_dict(net), network={"head_hidden_dim": 256, "vector_dim": None})
    with pytest.raises(SystemExit) as info:
        main(["export", str(step), str(tmp_path / "out")])
    assert str(info.value).startswith("error: network.head_hidden_dim=256 (a GELU output head, where diffusers has "
                                      "one linear proj_out) has no counterpart in diffusers' "
                                      f"CogVideoXTransformer3DModel, which would misread an adapter of it ({step})")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_import_errors_name_the_key(tmp_path):
    torch.manual_seed(0)
    net = DiffusionTransformer(**CONFIG)
    add_lora(net, rank=RANK, alpha=ALPHA)
    tensors, metadata = to_diffusers_lora(lora_state_dict(net), RANK, ALPHA)
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata)}

    unknown = dict(tensors)
    unknown["transformer.transformer_blocks.9.attn1.to_q.lora_A.weight"] = torch.zeros(RANK, 64)
    unknown["transformer.transformer_blocks.9.attn1.to_q.lora_B.weight"] = torch.zeros(64, RANK)
    save_file(unknown, tmp_path / "unknown.safetensors", metadata=header)
    fresh = DiffusionTransformer(**CONFIG)
    with pytest.raises(ValueError, match=r"key 'transformer_blocks.9.attn1.to_q.lora_A.default.weight' names module "
                                         r"'transformer_blocks.9.attn1.to_q', which the network does not have"):
        load_diffusers_lora(fresh, tmp_path / "unknown.safetensors")
    assert not lora_state_dict(fresh)  # refused before anything was injected

    wide = dict(tensors)
    wide["transformer.transformer_blocks.1.attn1.to_k.lora_A.weight"] = torch.zeros(RANK, 65)
    save_file(wide, tmp_path / "wide.safetensors", metadata=header)
    with pytest.raises(ValueError, match=r"key 'transformer_blocks.1.attn1.to_k.lora_A.default.weight' has shape "
                                         r"\(4, 65\) but the network expects \(4, 64\)"):
        load_diffusers_lora(DiffusionTransformer(**CONFIG), tmp_path / "wide.safetensors")

    stray = {**tensors, "transformer.transformer_blocks.0.attn1.to_q.lora_magnitude_vector": torch.zeros(64)}
    save_file(stray, tmp_path / "stray.safetensors", metadata=header)
    with pytest.raises(ValueError, match=r"key 'transformer_blocks.0.attn1.to_q.lora_magnitude_vector' is not a "
                                         r"LoRA weight"):
        from_diffusers_lora(tmp_path / "stray.safetensors")

    save_file(tensors, tmp_path / "bare.safetensors")  # no metadata: diffusers' own fallback, alpha = rank
    assert from_diffusers_lora(tmp_path / "bare.safetensors")[1:] == (RANK, float(RANK))
