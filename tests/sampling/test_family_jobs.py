"""Jobs on the newer models (a CogVideoX1.5-5B-I2V-like folder: 2-frame tokens, the ofs embedding and an image per
video): a .jsonl prompts file with its own image per line, a multi-prompt line among them, over 2 processes writes the
files of one, and a job cut short finishes under `resume=true` to the same files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.cogvideox_folder import make_cogvideox_folder
from tests.sampling.test_distributed_sample import ROOT, files, in_process, stop_after_videos, torchrun
from tests.sampling.test_family_cli import write_image
from vdm.data.video_io import read_mp4
from vdm.sampling.progress import RECORD


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_jobs")
    folder = make_cogvideox_folder(root / "CogVideoX1.5-5B-I2V", "15_i2v")
    lines = [{"prompt": "a red square moving right", "image": "a.png"},
             {"prompt": "a blue circle moving up", "image": "b.png"},
             {"prompts": ["a red square moving right", "a blue circle moving up", "a red circle moving down"],
              "image": "b.png"},
             {"prompt": "a green square moving left", "image": "a.png"}]
    write_image(root / "a.png", (32, 24))
    write_image(root / "b.png", (24, 40))
    (root / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    options = [f"pretrained={folder}", f"prompts_file={root / 'prompts.jsonl'}", "steps=3", "sampler=ddim",
               "batch_size=1", "tile_size=2", "overlap_size=0", "num_transition_blocks=0", "save_latents=true",
               "sampler.verbose=false"]
    return root, options


def test_two_processes_write_the_files_of_one(job, tmp_path):
    """Against one process with torchrun's thread count (the VAE's convolutions round differently on 2 threads):
    the single-prompt videos bit for bit, the multi-prompt one (its segment passes split between the processes)
    up to the rounding of a batch of another size (vdm.diffusion.multi_prompt)."""
    root, options = job
    two = torchrun([*options, f"output_dir={tmp_path / 'two'}"])
    one = tmp_path / "one"
    single = subprocess.run([sys.executable, "sample.py", *options, f"output_dir={one}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    _, stderr = two.communicate(timeout=300)
    assert two.returncode == 0, stderr[-3000:]
    expected = files(one)
    rows = [json.loads(line) for line in (one / "samples.jsonl").read_text().splitlines()]
    assert [Path(r["inputs"]["image"]).name for r in rows] == ["a.png", "b.png", "b.png", "a.png"]
    got = files(tmp_path / "two")
    assert len(expected) == 10 and got.keys() == expected.keys()  # 4 mp4s, 4 latents, samples.jsonl, index.html
    long = ("sample_0002.mp4", "sample_0002.safetensors")
    assert {k: v for k, v in got.items() if k not in long} == {k: v for k, v in expected.items() if k not in long}
    a, b = (load_file(folder / long[1])["latent"] for folder in (one, tmp_path / "two"))
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5
    assert np.abs(read_mp4(one / long[0]).astype(int) - read_mp4(tmp_path / "two" / long[0]).astype(int)).max() <= 1


def test_a_job_cut_short_resumes_to_the_same_files(job, tmp_path, monkeypatch):
    root, options = job
    out = tmp_path / "cut"
    stop_after_videos(monkeypatch, 2)  # the job stops after its second video
    with pytest.raises(KeyboardInterrupt):
        in_process([*options, f"output_dir={out}"])
    monkeypatch.undo()
    assert not (out / "samples.jsonl").exists() and len(list((out / RECORD).glob("sample_*.json"))) == 2
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    resumed = in_process([*options, f"output_dir={out}", "resume=true"])
    unbroken = in_process([*options, f"output_dir={tmp_path / 'unbroken'}"])
    assert files(resumed) == files(unbroken) and len(files(resumed)) == 10
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # the finished videos were not redone


def test_a_reference_case_file_runs_on_an_image_to_video_model(job, tmp_path):
    """DiTCtrl's case format (`args:`) with image= on the command line: a multi-prompt video whose first segment
    takes the image, and the isolated videos it asks for, in the case's own output_dir."""
    from tests.sampling.test_case_runs import case, run

    root, options = job
    folder = next(o.split("=", 1)[1] for o in options if o.startswith("pretrained="))
    out = tmp_path / "case_out"
    rows = run(Path(folder), case(tmp_path / "case.yaml", prompts=["a red square moving right", "a blue circle moving up",
                                                                   "a red circle moving down"],
                                  seed=7, overlap_size=0, num_transition_blocks=0, is_run_isolated=True,
                                  output_dir=str(out)),
               f"image={root / 'a.png'}", "steps=3", "tile_size=2")
    assert [r.get("role") for r in rows] == [None, "isolated", "isolated", "isolated", "isolated_all"]
    assert all(r["seed"] == 7 and Path(r["inputs"]["image"]).name == "a.png" for r in rows)
    assert rows[0]["layout"]["segments"] == 3 and (out / rows[0]["file"]).is_file()
