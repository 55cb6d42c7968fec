"""The CogVideoX family beyond 1.0 text-to-video through the CLI, against diffusers' own pipelines on tiny folders
that diffusers wrote, laid out like the released ones: `sample.py pretrained=<folder> ...` and the matching
pipeline (CogVideoXPipeline for 1.5, CogVideoXImageToVideoPipeline for the I2V models) on the same folder, with
zero negative embeddings and the pipeline's generator seeded with the job's seed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline
from safetensors.torch import load_file

from tests.cogvideox_folder import FAMILY_VARIANTS, make_cogvideox_folder
from vdm.data.video_io import read_mp4

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a panda playing guitar in a bamboo forest"
STEPS, SCALE, SEED = 10, 6.0, 0


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    return {name: make_cogvideox_folder(root / name, name) for name in FAMILY_VARIANTS}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def pipeline_outputs(pipe, dynamic: bool, **inputs) -> tuple[torch.Tensor, np.ndarray]:
    """The pipeline's final latents (1, T, C, H, W) (1.5: with its front padding) and frames (F, H, W, 3)."""
    pipe.set_progress_bar_config(disable=True)
    c = pipe.transformer.config
    cond, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=c.max_text_seq_length)
    kwargs = dict(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond), num_frames=c.sample_frames,
                  num_inference_steps=STEPS,
                  guidance_scale=SCALE, use_dynamic_cfg=dynamic, **inputs)
    with torch.no_grad():
        latents = pipe(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="latent").frames
        frames = pipe(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="np").frames[0]
    return latents, frames


def compare(out: Path, expected_latents: torch.Tensor, expected_frames: np.ndarray, name: str) -> None:
    row = json.loads((out / "samples.jsonl").read_text())
    latent = load_file(out / row["latent"])["latent"]
    expected = expected_latents[0, expected_latents.shape[1] - latent.shape[0]:]  # the decoded ones
    assert latent.shape == expected.shape
    rel = ((latent - expected).abs().max() / expected.abs().max()).item()
    frames = read_mp4(out / row["file"])
    assert frames.shape == expected_frames.shape
    pixel_err = np.abs(frames.astype(np.float64) - expected_frames * 255).max()
    print(f"{name}: latent relative error {rel:.2e}, max frame error {pixel_err:.2f}/255")
    assert rel <= 1e-4
    assert pixel_err <= 2


@pytest.mark.parametrize("dynamic", [False, True], ids=["cfg", "dynamic_cfg"])
def test_cogvideox_15_text_to_video_matches_the_pipeline(folders, tmp_path, dynamic):
    folder = folders["15_t2v"]
    out = tmp_path / "out"
    result = run_cli(f"pretrained={folder}", f"prompts=[{PROMPT}]", "sampler=ddim",
                     f"guider={'dynamic_cfg' if dynamic else 'cfg'}", f"cfg={SCALE}", f"steps={STEPS}", f"seed={SEED}",
                     "rescale=full", "save_latents=true", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    latents, frames = pipeline_outputs(CogVideoXPipeline.from_pretrained(folder), dynamic)
    assert latents.shape[1] == 4  # 3 latent frames (9 pixel frames) sampled as 4: one padding latent in front
    compare(out, latents, frames, "1.5 T2V")
    assert json.loads((out / "samples.jsonl").read_text())["fps"] == 16


def write_image(path: Path, size: tuple[int, int]) -> Path:
    """A smooth RGB picture (width, height), so that resizing and encoding it are well defined."""
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(w + h - 2, 1)], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("name, image_size, dynamic", [
    ("5b_i2v", None, False), ("15_i2v", None, False), ("15_i2v", (50, 30), False), ("5b_i2v", (20, 40), True)],
    ids=["5b_i2v", "15_i2v", "15_i2v_resized", "5b_i2v_resized_dynamic_cfg"])
def test_image_to_video_matches_the_pipeline(folders, tmp_path, name, image_size, dynamic):
    """CogVideoXImageToVideoPipeline on the same folder and image (of the video's size, or another one that both
    resize with Lanczos): the image posterior drawn from the seeded generator before the noise, scaled by 0.7
    (5B-I2V) or divided by it (1.5, invert_scale_latents), laid out over the frames; 1.5-I2V's ofs."""
    from diffusers import CogVideoXImageToVideoPipeline
    from PIL import Image

    folder = folders[name]
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(folder)
    c, s = pipe.transformer.config, pipe.vae_scale_factor_spatial
    size = image_size or (c.sample_width * s, c.sample_height * s)
    image = write_image(tmp_path / "first.png", size)
    out = tmp_path / "out"
    result = run_cli(f"pretrained={folder}", f"image={image}", f"prompts=[{PROMPT}]", "sampler=ddim",
                     f"guider={'dynamic_cfg' if dynamic else 'cfg'}", f"cfg={SCALE}", f"steps={STEPS}", f"seed={SEED}", "rescale=full", "save_latents=true",
                     f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    latents, frames = pipeline_outputs(pipe, dynamic, image=Image.open(image).convert("RGB"))
    compare(out, latents, frames, f"{name} {size}")


@pytest.mark.parametrize("variant, overrides, message", [
    ("15_t2v", ["image={image}"], r"image=.*: this model is text-to-video; image= takes an image-to-video model"),
    ("5b_i2v", [], r"this model is image-to-video: give image=<png\|jpg>"),
    ("5b_i2v", ["image={missing}"], r"image=.*missing.png: no such file"),
    ("5b_i2v", ["image={broken}"], r"image=.*broken.png: not a readable image"),
    ("5b_i2v", ["image={image}", "height=16"], r"height=16 width=32: this model's learned positions \(CogVideoX-5B-I2V\) "
                                               r"serve only 24x32"),
    ("15_t2v", ["num_frames=5"], r"num_frames=5 gives 2 latent frames; CogVideoX 1.5 samples an odd count"),
    ("15_i2v", ["image={image}", "prompts=[a,b]", "tile_size=2", "overlap_size=0", "control=[kv_sharing_mask_guided]"],
     r"the kv_sharing_mask_guided control needs control_options.ref_token_idx and control_options.cur_token_idx"),
    ("15_i2v", ["image={image}", "image_latent_scale=double"], r"image_latent_scale='double'.*valid: scale, invert, "
                                                              r"none"),
])
def test_family_refusals_write_nothing(folders, tmp_path, variant, overrides, message):
    from vdm.build import compose
    from vdm.config_schema import ConfigError, validate
    from vdm.sampling import sample

    image = write_image(tmp_path / "ok.png", (32, 24))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    paths = {"image": image, "missing": tmp_path / "missing.png", "broken": tmp_path / "broken.png"}
    out = tmp_path / "out"
    cfg = compose([f"pretrained={folders[variant]}", "prompts=x", "steps=2", f"output_dir={out}",
                   *(o.format(**paths) for o in overrides)], config_name="sample")
    with pytest.raises((ValueError, FileNotFoundError, ConfigError), match=message):
        validate(cfg, "sample", compose([], config_name="sample"))
        sample(cfg)
    assert not out.exists()


def test_sat_unscaled_image_latent_is_an_option(folders, tmp_path):
    """image_latent_scale=none (SAT's 1.5-I2V sampling) changes the video; the default follows diffusers."""
    from vdm.build import compose
    from vdm.sampling import sample

    folder, image = folders["15_i2v"], write_image(tmp_path / "first.png", (32, 24))
    latents = {}
    for rule in ("invert", "none"):
        out = tmp_path / rule
        sample(compose([f"pretrained={folder}", f"image={image}", f"prompts=[{PROMPT}]", "steps=3", f"seed={SEED}",
                        f"image_latent_scale={rule}", "save_latents=true", f"output_dir={out}",
                        "sampler.verbose=false"], config_name="sample"))
        latents[rule] = load_file(out / json.loads((out / "samples.jsonl").read_text())["latent"])["latent"]
    assert not torch.allclose(latents["invert"], latents["none"], atol=1e-3)


@pytest.fixture(scope="module")
def folder_2b(tmp_path_factory) -> Path:
    return make_cogvideox_folder(tmp_path_factory.mktemp("v2v") / "CogVideoX-2b", "2b")


def input_clip(path: Path, frames: int, H: int, W: int) -> Path:
    from vdm.data.synthetic import render_clip
    from vdm.data.video_io import write_mp4

    write_mp4(path, np.ascontiguousarray(render_clip("red", "square", "right", (2, 8), frames, W)[:, (W - H) // 2:][:, :H]))
    return path


@pytest.mark.parametrize("name, strength, dynamic", [("2b", 0.8, False), ("2b", 0.5, True), ("2b", 1.0, False)])
def test_video_to_video_matches_the_pipeline(folder_2b, folders, tmp_path, name, strength, dynamic):
    """CogVideoXVideoToVideoPipeline on the same 2B-like folder and clip: the clip's posterior sample
    (x scaling_factor) noised to the first of the last int(steps * strength) timesteps, then sampled over them."""
    from diffusers import CogVideoXVideoToVideoPipeline
    from PIL import Image

    folder = folder_2b if name == "2b" else folders[name]
    pipe = CogVideoXVideoToVideoPipeline.from_pretrained(folder)
    c, s = pipe.transformer.config, pipe.vae_scale_factor_spatial
    H, W = c.sample_height * s, c.sample_width * s
    video = input_clip(tmp_path / "input.mp4", c.sample_frames, H, W)
    frames_in = [Image.fromarray(f) for f in read_mp4(video)]  # what the CLI reads back
    out = tmp_path / "out"
    result = run_cli(f"pretrained={folder}", f"video={video}", f"strength={strength}", f"prompts=[{PROMPT}]",
                     "sampler=ddim", f"guider={'dynamic_cfg' if dynamic else 'cfg'}", f"cfg={SCALE}", f"steps={STEPS}",
                     f"seed={SEED}", "rescale=full", "save_latents=true", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads((out / "samples.jsonl").read_text())
    assert row["inputs"] == {"video": str(video), "strength": strength}
    pipe.set_progress_bar_config(disable=True)
    cond, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=c.max_text_seq_length)
    kwargs = dict(video=frames_in, prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond),
                  num_inference_steps=STEPS, guidance_scale=SCALE, use_dynamic_cfg=dynamic, strength=strength)
    with torch.no_grad():
        latents = pipe(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="latent").frames
        frames = pipe(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="np").frames[0]
    compare(out, latents, frames, f"v2v {name} strength={strength}")


def test_cogvideox_15_video_to_video_takes_an_odd_latent_count_behind_a_copy_of_its_first(folders, tmp_path):
    """9 frames (3 latents; diffusers' pipeline refuses odd counts on 1.5) are sampled as 4, a copy of the first
    latent in front, and the 3 after it decoded: at a low strength each output latent stays near the input's own, in
    order. An even count (5 frames) is refused as in text-to-video."""
    from vdm.build import compose
    from vdm.sampling import sample
    from vdm.sampling.load import load_pretrained

    folder = folders["15_t2v"]
    c = json.loads((folder / "transformer" / "config.json").read_text())
    video = input_clip(tmp_path / "input.mp4", 9, c["sample_height"] * 4, c["sample_width"] * 4)
    out = tmp_path / "out"
    sample(compose([f"pretrained={folder}", f"video={video}", "strength=0.04", "steps=50", "sampler=ddim", "guider=none",
                    f"prompts=[{PROMPT}]", f"seed={SEED}", "save_latents=true", f"output_dir={out}",
                    "sampler.verbose=false"], config_name="sample"))
    row = json.loads((out / "samples.jsonl").read_text())
    latent = load_file(out / row["latent"])["latent"]
    assert latent.shape[0] == 3 and read_mp4(out / row["file"]).shape[0] == 9
    engine = load_pretrained(folder).engine
    frames = torch.from_numpy(read_mp4(video).astype(np.float32) / 255.0).permute(0, 3, 1, 2)[None] * 2 - 1
    source = engine.encode_video(frames, torch.Generator().manual_seed(SEED))[0]  # the CLI's posterior draw
    for t in range(3):
        errors = [((latent[t] - source[u]).norm() / source[u].norm()).item() for u in range(3)]
        assert errors[t] < 0.7 * min(e for u, e in enumerate(errors) if u != t), (t, errors)
    input_clip(tmp_path / "even.mp4", 5, c["sample_height"] * 4, c["sample_width"] * 4)
    with pytest.raises(ValueError, match=r"num_frames=5 gives 2 latent frames; CogVideoX 1.5 samples an odd count"):
        sample(compose([f"pretrained={folder}", f"video={tmp_path / 'even.mp4'}", "prompts=x", "steps=2",
                        f"output_dir={tmp_path / 'no'}"], config_name="sample"))
    assert not (tmp_path / "no").exists()


def test_video_to_video_refusals_write_nothing(folder_2b, folders, tmp_path):
    from vdm.build import compose
    from vdm.data.video_io import write_mp4
    from vdm.sampling import sample

    write_mp4(tmp_path / "short.mp4", np.zeros((4, 24, 32, 3), np.uint8))
    write_mp4(tmp_path / "ok.mp4", np.zeros((9, 24, 32, 3), np.uint8))
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    cases = [
        (folder_2b, ["video={d}/ok.mp4", "strength=0"], r"strength=0 must be in \(0, 1\]"),
        (folder_2b, ["video={d}/ok.mp4", "strength=1.5"], r"strength=1.5 must be in \(0, 1\]"),
        (folder_2b, ["video={d}/ok.mp4", "strength=0.05"], r"keeps int\(2 \* 0.05\) = 0 of the 2 steps"),
        (folder_2b, ["video={d}/short.mp4"], r"short.mp4 has 4 frames; the VAE takes 4k\+1 \(give num_frames=1"),
        (folder_2b, ["video={d}/bad.mp4"], r"bad.mp4"),
        (folder_2b, ["video={d}/missing.mp4"], r"missing.mp4 does not exist"),
        (folder_2b, ["video={d}/ok.mp4", "num_frames=13"], r"ok.mp4 has 9 frames; num_frames=13 needs as many"),
        (folders["15_i2v"], ["video={d}/ok.mp4"], r"video-to-video takes a text-to-video model .* this one is "
                                                   r"image-to-video"),
        (folder_2b, ["video={d}/ok.mp4", "prompts=[a,b]"], r"a multi-prompt video from a video is not supported"),
        (folders["15_i2v"], ["video={d}/ok.mp4", "mode=edit", "prompts=[a,b]"],
         r"editing a video takes a text-to-video model"),
        (folder_2b, ["video={d}/ok.mp4", "mode=edit", "prompts=[a,b,c]"], r"mode=edit takes exactly two prompts"),
        (folder_2b, ["video={d}/ok.mp4", "mode=edit", "prompts=[a,b]", "inversion.cfg=0.5"],
         r"inversion.cfg=0.5 must be >= 1"),
    ]
    for folder, overrides, message in cases:
        out = tmp_path / "out"
        cfg = compose([f"pretrained={folder}", "prompts=x", "steps=2", f"output_dir={out}",
                       *(o.format(d=tmp_path) for o in overrides)], config_name="sample")
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            sample(cfg)
        assert not out.exists(), overrides


def test_text_length_is_an_option(folders, tmp_path):
    """text_length=6 (as SAT's 224 against diffusers' 226 on CogVideoX 1.5) changes the video and is recorded;
    a length beyond the network's is refused."""
    from vdm.build import compose
    from vdm.sampling import sample

    folder = folders["15_t2v"]
    latents = {}
    for length in (None, 6):
        out = tmp_path / f"len{length}"
        options = [] if length is None else [f"text_length={length}"]
        sample(compose([f"pretrained={folder}", f"prompts=[{PROMPT}]", "steps=3", "save_latents=true",
                        f"output_dir={out}", "sampler.verbose=false", *options], config_name="sample"))
        latents[length] = load_file(out / json.loads((out / "samples.jsonl").read_text())["latent"])["latent"]
    assert not torch.allclose(latents[None], latents[6], atol=1e-4)
    with pytest.raises(ValueError, match=r"text_length=8 must be in 1..7"):
        sample(compose([f"pretrained={folder}", "prompts=x", "text_length=8", f"output_dir={tmp_path / 'no'}"],
                       config_name="sample"))
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("overrides", [
    ["prompts=[a red square moving right,a blue circle moving up]", "overlap_size=2", "tile_size=4",
     "num_transition_blocks=0", "control=[base,kv_sharing]"],
    ["mode=edit", "prompts=[a red square moving right,a blue circle moving up]", "control=[kv_sharing]"],
    ["mode=reweight", "prompts=[a red square moving right]", "reweight_token_idx=1"],
], ids=["multi_prompt", "edit", "reweight"])
def test_ditctrl_modes_run_on_cogvideox_15(folders, tmp_path, overrides):
    """DiTCtrl's multi-prompt video (tiles of whole 2-frame tokens; an even long latent drops its first frame
    before decoding), edit and reweight pairs on a 1.5 text-to-video folder."""
    from vdm.build import compose
    from vdm.sampling import sample

    out = tmp_path / "out"
    sample(compose([f"pretrained={folders['15_t2v']}", "steps=4", f"output_dir={out}", "sampler.verbose=false",
                    "control_options={start_step:1,end_step:3}", *overrides], config_name="sample"))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for row in rows:
        frames = read_mp4(out / row["file"])
        assert frames.shape[0] % 4 == 1 and np.isfinite(frames).all()
    if "mode=edit" in overrides:
        assert [r["role"] for r in rows] == ["source", "target"]
    if "tile_size=4" in overrides:  # 2 segments of 4 latents overlapping by 2: 6 sampled, 5 decoded
        assert rows[0]["frames"] == 5 and read_mp4(out / rows[0]["file"]).shape[0] == 17
        reference = tmp_path / "reference"  # the reference schedule gives the reuse schedule's video
        sample(compose([f"pretrained={folders['15_t2v']}", "steps=4", f"output_dir={reference}", "reuse=false",
                        "sampler.verbose=false", "control_options={start_step:1,end_step:3}", *overrides],
                       config_name="sample"))
        for row in rows:
            a, b = read_mp4(out / row["file"]).astype(int), read_mp4(reference / row["file"]).astype(int)
            assert np.abs(a - b).max() <= 1


def test_a_jsonl_prompts_file_gives_each_video_its_image(folders, tmp_path):
    """Each line's image conditions its own video: a video equals the one sampled alone from its image, and the
    two images give different videos; samples.jsonl records each video's image."""
    from vdm.build import compose
    from vdm.sampling import sample

    folder = folders["5b_i2v"]
    write_image(tmp_path / "a.png", (32, 24))
    write_image(tmp_path / "b.png", (24, 40))
    lines = [{"prompt": PROMPT, "image": "a.png"}, {"prompts": ["a red square moving right"], "image": "b.png"}]
    (tmp_path / "videos.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    base = [f"pretrained={folder}", "steps=3", "save_latents=true", "sampler.verbose=false", "batch_size=2"]
    out = tmp_path / "both"
    sample(compose([*base, f"prompts_file={tmp_path / 'videos.jsonl'}", f"output_dir={out}"], config_name="sample"))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["inputs"]["image"] for r in rows] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    alone = tmp_path / "alone"
    sample(compose([*base, f"prompts=[{PROMPT}]", f"image={tmp_path / 'a.png'}", f"output_dir={alone}"],
                   config_name="sample"))
    first = load_file(out / rows[0]["latent"])["latent"]
    torch.testing.assert_close(first, load_file(alone / "sample_0000.safetensors")["latent"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(first, load_file(out / rows[1]["latent"])["latent"], atol=1e-3)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "picture": "a.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 1 must be an object with \"prompt\""):
        sample(compose([*base, f"prompts_file={tmp_path / 'bad.jsonl'}", f"output_dir={tmp_path / 'no'}"],
                       config_name="sample"))
    assert not (tmp_path / "no").exists()


def test_training_a_folder_with_another_models_preset_is_refused_in_one_line(folders, tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, "train.py", "experiment=cogvideox_5b_lora", f"pretrained={folders['15_i2v']}",
                             f"runs_root={tmp_path}", "max_steps=1"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "is cogvideox15_5b_i2v but the config describes cogvideox_5b: train it with " \
        "experiment=cogvideox15_5b_i2v_lora" in result.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.rglob("*.safetensors"))  # Hydra's run log only: no checkpoint


@pytest.mark.parametrize("name", ["5b_i2v", "15_i2v"])
def test_ditctrl_modes_run_on_image_to_video(folders, tmp_path, name):
    """An edit pair from an image: its source row is the single video of that image and seed (the target never
    changes the source); a multi-prompt video whose first segment takes the image changes with the image, and so
    does its first prompt's isolated video (is_run_isolated), not the second's (the zero image latent)."""
    from PIL import Image

    from vdm.build import compose
    from vdm.sampling import sample

    folder = folders[name]
    images = [write_image(tmp_path / "a.png", (32, 24)), write_image(tmp_path / "b.png", (24, 40))]
    base = [f"pretrained={folder}", "steps=4", "sampler=ddim", "save_latents=true", "sampler.verbose=false"]

    def run(out, *overrides):
        sample(compose([*base, f"output_dir={tmp_path / out}", *overrides], config_name="sample"))
        rows = [json.loads(line) for line in (tmp_path / out / "samples.jsonl").read_text().splitlines()]
        return [load_file(tmp_path / out / r["latent"])["latent"] for r in rows if "latent" in r]

    pair = ["prompts=[a red square moving right,a blue circle moving up]", "control_options={start_step:1,end_step:3}"]
    source, target = run("edit", "mode=edit", f"image={images[0]}", *pair)
    (single,) = run("single", "prompts=[a red square moving right]", f"image={images[0]}")
    torch.testing.assert_close(source, single, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(source, target, atol=1e-3)
    run("reweight", "mode=reweight", "prompts=[a red square moving right]", "reweight_token_idx=1",
        f"image={images[0]}")
    tiles = ["tile_size=4", "overlap_size=2"] if "15" in name else ["tile_size=3", "overlap_size=1"]  # 5 decoded
    long = [*tiles, "num_transition_blocks=0", "is_run_isolated=true", *pair]
    with_a, first_a, second_a = run("long_a", *long, f"image={images[0]}")
    with_b, first_b, second_b = run("long_b", *long, f"image={images[1]}")
    assert not torch.allclose(with_a[:2], with_b[:2], atol=1e-3)
    assert not torch.allclose(first_a, first_b, atol=1e-3)
    torch.testing.assert_close(second_a, second_b, rtol=0, atol=0)
    # the controls that draw: mask-guided KV-sharing's masks per pair, visualize's maps over the token grid
    # (1.5: 2 latent frames a token, so 2 token frames for 3 latents and the padding one)
    masks = tmp_path / "masks"
    run("masked", *long, f"image={images[0]}", "control=[kv_sharing_mask_guided]",
        f"control_options={{start_step:1,end_step:3,start_layer:0,end_layer:2,ref_token_idx:[2],cur_token_idx:[2],"
        f"save_masks_dir:{masks}}}")
    assert {p.name for p in (masks / "sample_0000" / "step001_pass0").iterdir()} == {
        f"layer{layer:02d}_pair{pair}_{role}.png" for layer in (0, 1) for pair in (0, 1) for role in ("source", "target")}
    run("maps", "prompts=[a red square moving right]", f"image={images[0]}", "control=[visualize]",
        "attn_map_step_idx=[1]", "attn_map_layer_idx=[1]", "control_options.token_idx=[1]")
    maps = tmp_path / "maps" / "attn_map" / "sample_0000" / "step001_pass0"
    token_frames = 2 if "15" in name else 3
    assert Image.open(maps / "layer01_row0_temporal_h01_w02.png").size == (token_frames, token_frames)


def test_cogvideox_15_edits_a_video_from_its_inversion(folders, tmp_path):
    """mode=edit video=<9 frames> on a 1.5 text-to-video folder: the odd latent count is inverted and sampled behind a
    copy of its first latent (whole 2-frame tokens), and the clip's own 3 latents are decoded in both rows."""
    from vdm.build import compose
    from vdm.sampling import sample

    folder = folders["15_t2v"]
    c = json.loads((folder / "transformer" / "config.json").read_text())
    video = input_clip(tmp_path / "input.mp4", 9, c["sample_height"] * 4, c["sample_width"] * 4)
    out = sample(compose([f"pretrained={folder}", "mode=edit", f"video={video}", "steps=4", "save_latents=true",
                          f"prompts=[{PROMPT},{PROMPT} at night]", f"output_dir={tmp_path / 'out'}",
                          "sampler.verbose=false"], config_name="sample"))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["role"] for r in rows] == ["source", "target"] and rows[0]["sampler"] == "VideoDDIMSampler"
    assert [r["guider"] for r in rows] == ["IdentityGuider", "DynamicCFG"] and rows[0]["inputs"]["reconstruction_psnr"] > 0
    for row in rows:
        assert load_file(out / row["latent"])["latent"].shape[0] == 3 and read_mp4(out / row["file"]).shape[0] == 9
