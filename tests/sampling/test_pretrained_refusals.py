"""`sample.py pretrained=<dir>`: folders that are not released CogVideoX 1.0 text-to-video folders, and bad
options, are one-line errors before anything is loaded or written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cogvideox_folder import make_cogvideox_folder
from vdm.build import compose
from vdm.sampling import sample

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_cogvideox_folder(tmp_path_factory.mktemp("refusals") / "CogVideoX-2b", "2b")


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def broken(folder: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    if how == "other_pipeline":
        edit_json(copy / "model_index.json", _class_name="StableDiffusionPipeline")
    elif how == "image_to_video":  # an I2V pipeline over a text-to-video transformer
        edit_json(copy / "model_index.json", _class_name="CogVideoXImageToVideoPipeline")
    elif how == "unknown_variant":  # 1.5's 2-frame tokens on a sin-cos (2B) transformer: no released model
        edit_json(copy / "transformer" / "config.json", patch_size_t=2, sample_frames=81)
    elif how == "epsilon":
        edit_json(copy / "scheduler" / "scheduler_config.json", prediction_type="epsilon")
    elif how == "no_model_index_no_transformer":
        (copy / "model_index.json").unlink()
        shutil.rmtree(copy / "transformer")
    else:  # a missing component folder
        shutil.rmtree(copy / how)
    return copy


@pytest.mark.parametrize("how, message", [
    ("other_pipeline", r"model_index.json names 'StableDiffusionPipeline': not a CogVideoXPipeline or "
                       r"CogVideoXImageToVideoPipeline folder"),
    ("image_to_video", r"transformer/config.json: in_channels=4, but an image-to-video model over the VAE's 4 "
                       r"latent channels takes 8 \(the noisy latent and the image latent\)"),
    ("unknown_variant", r"network.patch_size_t \(CogVideoX 1.5\) needs use_rotary_positional_embeddings=true"),
    ("epsilon", r"scheduler_config.json: prediction_type='epsilon' is not supported \(CogVideoX uses 'v_prediction'\)"),
    ("no_model_index_no_transformer", r"is not a CogVideoX folder: it has no model_index.json"),
    ("scheduler", r"missing component scheduler/"),
    ("vae", r"missing component vae/"),
    ("text_encoder", r"missing component text_encoder/"),
    ("tokenizer", r"missing component tokenizer/"),
])
def test_folder_refusals(folder, tmp_path, how, message):
    bad = broken(folder, tmp_path, how)
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sample(compose([f"pretrained={bad}", "prompts=x", "steps=2", f"output_dir={out}"], config_name="sample"))
    assert not out.exists()


@pytest.mark.parametrize("overrides, message", [
    (["dtype=fp8"], r"dtype='fp8'; valid: bf16, fp16, fp32"),
    (["rescale=half"], r"rescale='half'; valid: subset, full"),
    (["checkpoint=runs/x"], r"give pretrained=<CogVideoX folder> or checkpoint=<run>, not both"),
    (["num_frames=10"], r"num_frames=10 must be r\*k\+1"),
])
def test_option_refusals(folder, tmp_path, overrides, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        sample(compose([f"pretrained={folder}", "prompts=x", "steps=2", f"output_dir={out}", *overrides],
                       config_name="sample"))
    assert not out.exists()


def test_cli_refusal_is_one_line_and_non_zero(folder, tmp_path):
    bad = broken(folder, tmp_path, "vae")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "sample.py", f"pretrained={bad}", "prompts=x", f"output_dir={out}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing component vae/" in errors[0]
    assert not out.exists()
