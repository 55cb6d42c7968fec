"""mode=edit video=<mp4>: a clip the model never drew, inverted by a small trained model, is reconstructed better
than its caption sampled from fresh noise, and (slow) edits to another colour read as that colour on the clip's path;
the job resumes to the same files, deals its pairs to two processes and refuses bad input in one line. The CogVideoX
1.5 edit is in tests/sampling/test_family_cli.py."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_NETWORK
from tests.sampling.test_distributed_sample import files, stop_after_videos, torchrun
from tests.test_sample import trained_run
from vdm.build import compose
from vdm.data.synthetic import COLOURS, SyntheticWorld
from vdm.data.video_io import read_mp4, write_mp4
from vdm.eval.synthetic import classify_clip
from vdm.sampling import sample
from vdm.sampling.progress import RECORD
from vdm.training.loop import train


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, str, Path]:
    """A clip of the world (mp4, caption) and a run trained for 2 steps (for what needs no trained model)."""
    root = tmp_path_factory.mktemp("inversion_jobs")
    frames, caption = SyntheticWorld(seed=7).render(0)
    write_mp4(root / "clip.mp4", frames, fps=8)
    return root / "clip.mp4", caption, trained_run(root)


class TwoColourWorld(SyntheticWorld):
    """The synthetic world narrowed to a red or green square moving right, from any start: a tiny model learns
    its two captions in a few hundred steps, and where the square is comes from the noise alone."""

    CAPTIONS = ("a red square moving right", "a green square moving right")

    def spec(self, index: int) -> tuple[str, tuple[int, int]]:
        rng = self._rng(index)
        (x_lo, x_hi), (y_lo, y_hi) = self._ranges["right"]
        x, y = rng.integers((x_lo, y_lo), (x_hi + 1, y_hi + 1))
        return self.CAPTIONS[int(rng.integers(2))], (int(x), int(y))


def train_two_colour(root: Path, steps: int, *network: str) -> Path:
    cfg = compose([*network, f"runs_root={root}", "run_name=world", "batch_size=8", f"max_steps={steps}",
                   "log_every=100", "video_every=0", "checkpoint.every=null", f"data._target_={__name__}.TwoColourWorld",
                   "scheduler.warmup_steps=5", "sampler.verbose=false"], config_name="train")
    train(cfg, root / "world")
    frames, _ = TwoColourWorld(seed=7).render(0)  # a clip the run never drew (it trains on seed 0)
    write_mp4(root / "clip.mp4", frames, fps=8)
    return root


def options(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"checkpoint={root / 'world'}", f"output_dir={out}", "steps=20", "sampler.verbose=false", *extra]


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255.0 ** 2 / ((a.astype(float) - b.astype(float)) ** 2).mean())


def edit_clip(root: Path, out: Path, *extra: str) -> tuple[dict, dict, str]:
    """The clip edited to the other colour: (source row, target row, target caption)."""
    caption = TwoColourWorld(seed=7).caption_of(0)
    colour = caption.split()[1]
    target = caption.replace(colour, "green" if colour == "red" else "red")
    out = sample(compose(options(root, out, "mode=edit", f"video={root / 'clip.mp4'}", f"prompts=[{caption},{target}]",
                                 *extra), config_name="sample"))
    source, edit = rows_of(out)
    return {**source, "path": out / source["file"]}, {**edit, "path": out / edit["file"]}, target


def test_an_inverted_clip_is_reconstructed_better_than_from_fresh_noise(tmp_path_factory, tmp_path):
    """A tiny DiT trained for a few hundred steps: the reconstruction of a clip it never drew, from the clip's DDIM
    inversion, beats the same caption sampled from fresh noise (where the square is comes from the noise)."""
    root = train_two_colour(tmp_path_factory.mktemp("inversion_tiny"), 200, *TINY_NETWORK)
    source, edit, _ = edit_clip(root, tmp_path / "edit")
    assert (source["role"], edit["role"]) == ("source", "target") and source["sampler"] == "VideoDDIMSampler"
    assert (source["guider"], source["cfg"], edit["guider"], edit["cfg"]) == ("IdentityGuider", None, "VanillaCFG", 3.0)
    assert source["inputs"]["video"] == str(root / "clip.mp4") and source["inputs"]["inversion"] == {
        "cfg": None, "iterations": 0, "source_cfg": None, "target_cfg": None}
    clip, reconstruction = read_mp4(root / "clip.mp4"), read_mp4(source["path"])
    assert source["inputs"]["reconstruction_psnr"] == pytest.approx(psnr(reconstruction, clip), abs=1e-3)
    fresh = sample(compose(options(root, tmp_path / "fresh", f"prompts=[{source['prompts'][0]}]", "sampler=ddim"),
                           config_name="sample"))
    from_noise = psnr(read_mp4(fresh / rows_of(fresh)[0]["file"]), clip)
    assert source["inputs"]["reconstruction_psnr"] > from_noise + 3, (source["inputs"], from_noise)


def colour_edits(checkpoint: Path, root: Path, clips: int) -> list[tuple[str, dict, dict, float]]:
    """Drawn clips of the whole world edited to the next colour through sample.py: (target caption, what the judge
    reads in the edit, in the clip, reconstruction PSNR)."""
    world, found, colours = SyntheticWorld(seed=1234), [], list(COLOURS)
    for i in range(clips):
        frames, caption = world.render(i)
        write_mp4(root / f"clip_{i}.mp4", frames, fps=8)
        colour = caption.split()[1]
        target = caption.replace(colour, colours[(colours.index(colour) + 1) % len(colours)])
        out = sample(compose([f"checkpoint={checkpoint}", "mode=edit", f"video={root / f'clip_{i}.mp4'}",
                              f"prompts=[{caption},{target}]", f"output_dir={root / f'edit_{i}'}", "steps=20",
                              "sampler.verbose=false"], config_name="sample"))
        source, edit = rows_of(out)
        found.append((target, classify_clip(read_mp4(out / edit["file"])), classify_clip(frames),
                      source["inputs"]["reconstruction_psnr"]))
    return found


@pytest.mark.slow
def test_an_inversion_edit_changes_the_colour_the_judge_reads_on_the_same_path(tmp_path):
    """The default recipe trained for 2000 steps on the whole world: drawn clips edited to the next colour read as
    that colour to `vdm.eval.synthetic`'s judge, mostly on the clip's path, with reconstructions above 24 dB."""
    cfg = compose([f"runs_root={tmp_path}", "run_name=world", "max_steps=2000", "video_every=0", "checkpoint.every=null",
                   "sampler.verbose=false"], config_name="train")
    train(cfg, tmp_path / "world")
    edits = colour_edits(tmp_path / "world", tmp_path, clips=4)
    assert all(read["colour"] == target.split()[1] and psnr > 24 for target, read, _, psnr in edits), edits
    kept = [np.abs(clip["centroids"] - read["centroids"]).max() <= 2.0 for _, read, clip, _ in edits]
    assert sum(kept) >= 3, edits  # the step-2000 checkpoint of the default run: 3 of 4 within 2 px, one at 2.3


def edit_job(clip, *extra: str) -> list[str]:
    path, caption, run_dir = clip
    return [f"checkpoint={run_dir}", "mode=edit", f"video={path}", "steps=4", "sampler.verbose=false",
            f"prompts=[{caption},{caption.replace('moving', 'going')}]", "save_latents=true", *extra]


def test_an_edit_job_cut_short_resumes_to_the_same_files(clip, tmp_path, monkeypatch):
    job = edit_job(clip, "num_samples=2")
    stop_after_videos(monkeypatch, 2)  # the job stops after its first pair
    with pytest.raises(KeyboardInterrupt):
        sample(compose([*job, f"output_dir={tmp_path / 'cut'}"], config_name="sample"))
    monkeypatch.undo()
    assert len(list((tmp_path / "cut" / RECORD).glob("sample_*.json"))) == 1
    resumed = sample(compose([*job, f"output_dir={tmp_path / 'cut'}", "resume=true"], config_name="sample"))
    unbroken = sample(compose([*job, f"output_dir={tmp_path / 'unbroken'}"], config_name="sample"))
    assert files(resumed) == files(unbroken)
    assert len([name for name in files(resumed) if name.endswith(".safetensors")]) == 4  # 2 pairs


@pytest.mark.slow  # ~20 s of process start-up; make test's torchrun runs are in test_distributed_sample.py
def test_edit_pairs_of_a_video_are_dealt_to_two_processes(clip, tmp_path):
    """torchrun: each process inverts the video for its own pairs; the files equal one process's."""
    job = edit_job(clip, "num_samples=2")
    two = torchrun([*job, f"output_dir={tmp_path / 'two'}"])
    one = sample(compose([*job, f"output_dir={tmp_path / 'one'}"], config_name="sample"))
    _, stderr = two.communicate(timeout=300)
    assert two.returncode == 0, stderr[-3000:]
    got, expected = files(tmp_path / "two"), files(one)
    assert len([n for n in expected if n.endswith(".mp4")]) == 4 and got == expected


@pytest.mark.parametrize(("extra", "message"), [
    (["prompts=[a red square moving right]"], r"mode=edit takes exactly two prompts"),
    (["video={d}/long.mp4"], r"long.mp4 has 11 frames; the model takes at most 9 \(give num_frames=9"),
    (["video={d}/bad.mp4"], r"bad.mp4"),
    (["sampler=dpmpp"], r"sampler=VPSDEDPMPP2MSampler: mode=edit with video= samples with DDIM"),
    (["inversion.target_cfg=0"], r"inversion.target_cfg=0 must be >= 1"),
])
def test_bad_edit_input_is_one_line_and_writes_nothing(clip, tmp_path, extra, message):
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    write_mp4(tmp_path / "long.mp4", np.zeros((11, 32, 32, 3), np.uint8))
    keys = {o.split("=")[0] for o in extra}
    job = [o for o in edit_job(clip) if o.split("=")[0] not in keys] + [o.format(d=tmp_path) for o in extra]
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sample(compose([*job, f"output_dir={out}"], config_name="sample"), explicit=frozenset(keys))
    assert not out.exists()
