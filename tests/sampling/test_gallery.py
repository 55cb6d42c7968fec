"""index.html beside a sampling job's videos: kept current as units finish (and under resume=true), every file it
names present, the controls of one video in one row, an edit as input | source | target, a multi-prompt video's
frames marked by prompt; in headless Chromium every video loads at its file's size. `python -m vdm.eval.gallery`
puts two jobs side by side."""

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.cogvideox_folder import make_cogvideox_folder
from vdm.build import compose
from vdm.data.synthetic import SyntheticWorld
from vdm.data.video_io import probe, read_mp4, write_mp4
from vdm.eval.gallery import main as gallery_main
from vdm.sampling import gallery, sample
from vdm.sampling import run as sampling_run
from vdm.sampling.gallery import segments
from vdm.sampling.output import write_jsonl

PROMPTS = ["a red square moving right", "a blue circle moving up"]
EDIT = ["a yellow circle moving up", "a green circle moving down"]


def options(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"pretrained={root / 'CogVideoX-2b'}", f"output_dir={out}", "steps=2", "sampler.verbose=false", *extra]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Two multi-prompt videos (control=[base,kv_sharing]) cut short after the first and resumed, and an edit
    pair: (root, the multi-prompt job, its page when cut short, the edit job)."""
    root = tmp_path_factory.mktemp("gallery")
    make_cogvideox_folder(root / "CogVideoX-2b", "2b")  # random weights: a VAE that compresses 4 frames into 1
    multi = options(root, root / "multi", f"prompts={PROMPTS}", "control=[base,kv_sharing]", "tile_size=2",
                    "overlap_size=1", "num_transition_blocks=0", "control_options={start_step:0,end_step:1}")
    real_sample = sampling_run.sample_long_video

    def stop_at_the_second(session, unit, writes):
        if unit.name == "sample_0001":
            raise KeyboardInterrupt
        return real_sample(session, unit, writes)

    sampling_run.sample_long_video = stop_at_the_second
    try:
        with pytest.raises(KeyboardInterrupt):
            sample(compose(multi, config_name="sample"))
    finally:
        sampling_run.sample_long_video = real_sample
    cut = (root / "multi" / "index.html").read_text()
    (root / "multi" / "web" / "sample_0001.mp4").write_bytes(b"a copy cut short")  # a stale unit's leftovers
    (root / "multi" / "web" / ".sample_0001.mp4.x.tmp.mp4").write_bytes(b"")
    sample(compose([*multi, "resume=true"], config_name="sample"))

    sample(compose(options(root, root / "edit", "mode=edit", f"prompts={EDIT}", "control=kv_sharing"),
                   config_name="sample"))
    return root, root / "multi", cut, root / "edit"


class Page(HTMLParser):
    """The parts of a page the tests read: rows of figures (their data- attributes and media), links, text."""

    def __init__(self, text: str):
        super().__init__()
        self.rows, self.links, self.text = [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.rows.append([])
        elif tag == "figure" and "cell" in attrs.get("class", ""):
            self.rows[-1].append(attrs)
        elif tag in ("video", "img") and self.rows and self.rows[-1]:
            self.rows[-1][-1].setdefault("media", []).append(attrs)
        if tag in ("video", "img", "a") and (attrs.get("src") or attrs.get("href")):
            self.links.append(attrs.get("src") or attrs.get("href"))

    def handle_data(self, data):
        self.text.append(data)


def read_page(path: Path) -> Page:
    return Page(path.read_text())


def test_the_page_was_current_when_cut_short_and_is_complete_after_resume(jobs):
    _, multi, cut, _ = jobs
    assert cut.count("<video ") == 1 and "sample_0000.mp4" in cut and "sample_0001" not in cut
    page = read_page(multi / "index.html")
    assert not list((multi / "web").glob(".*"))  # the cut-short copy's temporary went with the unit's leftovers
    assert [[(f["data-control"], f["data-role"]) for f in row] for row in page.rows] == [
        [("base", "video"), ("kv_sharing", "video")]]  # the controls of one video in one row
    for name in ("sample_0000", "sample_0001"):  # lossless RGB kept; the web copy 4:2:0, 4x, same frames
        lossless, web = multi / f"{name}.mp4", multi / "web" / f"{name}.mp4"
        assert stream(lossless) == ("h264", "gbrp") and stream(web) == ("h264", "yuv420p")
        assert probe(web)[:3] == (9, 96, 128) and probe(lossless)[:3] == (9, 24, 32)
        assert abs(read_mp4(web)[:, ::4, ::4].astype(int) - read_mp4(lossless)).mean() < 8
    twin = shutil.copytree(multi, multi.parent / "twin")  # the page names no folder: the same job, the same page
    gallery.update(twin, "both")
    assert (twin / "index.html").read_bytes() == (multi / "index.html").read_bytes()
    shutil.rmtree(twin)


def stream(path: Path) -> tuple[str, str]:
    import av

    with av.open(str(path)) as container:
        s = container.streams.video[0]
        return s.codec_context.name, s.codec_context.pix_fmt


def test_every_file_the_page_names_exists_and_every_prompt_is_on_it(jobs):
    _, multi, _, edit = jobs
    for folder, prompts in ((multi, PROMPTS), (edit, EDIT)):
        page = read_page(folder / "index.html")
        assert page.links and all((folder / link).is_file() for link in page.links)
        assert not [link for link in page.links if "://" in link or link.startswith("/")]  # relative: self-contained
        text = " ".join(page.text)
        assert all(p in text for p in prompts)
        assert "<script src" not in (folder / "index.html").read_text()


def test_an_edit_shows_source_and_target_side_by_side(jobs):
    _, _, _, edit = jobs
    (row,) = read_page(edit / "index.html").rows
    assert [f["data-role"] for f in row] == ["source", "target"]
    assert [f["media"][0]["src"] for f in row] == ["web/sample_0000.mp4", "web/sample_0000_target.mp4"]


def test_an_edit_of_a_video_shows_input_source_and_target(tmp_path):
    """The rows an edit of `video=` records (the input's path in "inputs"): the input is copied into web/ and
    shown first, the job's folder alone holding what the page plays."""
    frames, _ = SyntheticWorld(seed=7).render(0)
    clip = write_mp4(tmp_path / "clip.mp4", frames, fps=8)
    out = tmp_path / "job"
    rows = []
    for name, role, prompt in (("sample_0000", "source", EDIT[0]), ("sample_0000_target", "target", EDIT[1])):
        write_mp4(out / f"{name}.mp4", frames[:, ::-1] if role == "target" else frames, fps=8)
        rows.append({"file": f"{name}.mp4", "prompts": [prompt], "seed": 42, "sampler": "VideoDDIMSampler",
                     "steps": 2, "cfg": None, "guider": "IdentityGuider", "control": "kv_sharing",
                     "control_options": {}, "mode": "edit", "dtype": "float32", "fps": 8, "source": "run",
                     "role": role, "inputs": {"video": str(clip), **({"reconstruction_psnr": 31.5} if role == "source"
                                                                     else {})}})
    write_jsonl(rows, out / "samples.jsonl")
    gallery.update(out, "both")
    clip.unlink()  # the page needs nothing outside its folder
    page = read_page(out / "index.html")
    (row,) = page.rows
    assert [f["data-role"] for f in row] == ["input", "source", "target"]
    assert row[0]["media"][0]["src"].startswith("web/input-clip-") and all((out / link).is_file() for link in page.links)
    assert "reconstruction_psnr" in "".join(page.text) and probe(out / row[0]["media"][0]["src"])[:3] == (9, 128, 128)


def test_a_multi_prompt_video_marks_the_frames_of_each_prompt(jobs):
    _, multi, _, _ = jobs
    html = (multi / "index.html").read_text()
    assert re.findall(r'title="frames (\d+-\d+) [^"]*: (P[^"]*)"', html)[:3] == [
        ("0-0", "P1"), ("1-4", "P1 + P2"), ("5-8", "P2")]  # latent frames 0 | 1 | 2 of segments at 0 and 1
    cogvideox = {"frames": 21, "prompts": ["a", "b"],  # P1, a transition, P2 at 0, 4, 8 of 21 latent frames
                 "layout": {"tile_size": 13, "overlap_size": 9, "num_transition_blocks": 1}}
    assert segments(cogvideox, 81) == [(0, 13, [0], "P1"), (13, 65, [0, 1], "P1 + P2"), (65, 81, [1], "P2")]


def test_several_jobs_side_by_side_and_one_line_refusals(jobs, tmp_path, capsys):
    _, multi, _, edit = jobs
    assert gallery_main([str(multi), str(edit), str(tmp_path / "both.html")]) == 0
    page = read_page(tmp_path / "both.html")
    assert [len(row) for row in page.rows] == [2, 2] and all((tmp_path / link).is_file() for link in page.links)
    (tmp_path / "empty").mkdir()
    assert gallery_main([str(tmp_path / "empty"), str(tmp_path / "b.html")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no samples.jsonl" in err and not (tmp_path / "b.html").exists()
    assert gallery_main([str(multi), str(tmp_path / "both.html")]) == 1
    assert "already exists" in capsys.readouterr().err


# Records where each figure sits once the page has laid out (added to a copy of the page, not to the page).
PROBE = "<script>for(const f of document.querySelectorAll('figure.cell'))f.dataset.top=f.getBoundingClientRect().top" \
        "</script></body>"


def test_every_video_loads_in_headless_chromium(jobs, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Chromium is not installed: apt-get install -y chromium (as root; .ci/run installs it in CI)")
    _, multi, _, edit = jobs
    for folder, prompts in ((multi, PROMPTS), (edit, EDIT)):
        probe_page = folder / "probe.html"
        probe_page.write_text((folder / "index.html").read_text().replace("</body>", PROBE))
        try:
            dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                  "--disable-component-update", "--disable-sync", "--no-first-run", "--mute-audio",
                                  f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000",
                                  "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()],
                                 capture_output=True, text=True, timeout=60).stdout
        finally:
            probe_page.unlink()
        page = Page(dom)
        videos = [m for row in page.rows for f in row for m in f.get("media", []) if "data-width" in m]
        assert videos and 'data-videos-done="true"' in dom and f"<title>{folder.name}</title>" in dom
        for video in videos:  # decoded, at the size of the file it plays
            assert "data-error" not in video and int(video["data-ready-state"]) >= 1, video
            assert (video["data-video-width"], video["data-video-height"]) == (video["data-width"], video["data-height"])
        assert all(p in " ".join(page.text) for p in prompts)
        for row in page.rows:  # the videos of one row sit side by side
            assert len({f["data-top"] for f in row}) == 1, row
