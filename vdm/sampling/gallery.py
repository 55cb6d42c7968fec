"""A sampling job's gallery: `index.html` beside its videos, rewritten (atomically) each time a unit of work is
recorded and once more from samples.jsonl when the job finishes.

A row per video: its prompts and seed on top, and side by side every video made from them with the same noise --
one per control (control=[base,kv_sharing]), an edit's input | source | target, a multi-prompt video with a strip
under it marking which frames belong to which prompt (and, with is_run_isolated, each prompt's own video) -- each
with how it was made: what the row's videos share is said once, what differs under each video. Attention maps and
masks the job wrote open below the row.

The page plays the web copies in `web/` (video_format=both: H.264 4:2:0, which every current browser decodes) or
else the lossless mp4s; an edit's input video and an image-to-video's image are copied into `web/` too, so the
folder is self-contained. Nothing is fetched: style and script are inline. `python -m vdm.eval.gallery` puts
several jobs on one page, matching their videos by prompts and seed.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from vdm.atomic import atomic_path
from vdm.data.video_io import probe, web_encoder
from vdm.diffusion.multi_prompt import plan_segments, segment_starts
from vdm.errors import BadInput, NotFound
from vdm.sampling.output import WEB, check_video_format, web_copy, write_web_copy
from vdm.sampling.progress import RECORD

PAGE = "index.html"
MAX_MAPS = 120  # images shown per attention-map or mask folder (the others are counted)
COLOURS = ("#e4572e", "#2e86ab", "#76b041", "#ffc914", "#7d5ba6", "#17bebb", "#f18f01", "#c73e1d")
# Row keys told elsewhere on the page (prompts and seed on top, files as links, inputs as their own cells).
TOLD = {"file", "latent", "prompts", "seed", "role", "segment", "frames", "layout", "sampler", "steps", "cfg",
        "guider", "control", "control_options", "inputs", "cache", "fps"}
ISOLATED = ("isolated", "isolated_all")  # is_run_isolated: each prompt's own video, and all of them in turn
MAP_OPTIONS = ("out_dir", "save_masks_dir")  # control options naming the folders of attention maps and masks


@dataclass
class Job:
    """A sampling job's folder and the samples.jsonl rows of its videos so far."""

    label: str
    folder: Path
    rows: list[dict]
    finished: bool


@dataclass
class Video:
    """A job's video with those made beside it: [row], an edit's [source, target], a multi-prompt video and its
    prompts' isolated videos."""

    job: Job
    rows: list[dict] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Videos with the same key share a page row: the same prompts, seed, mode and inputs."""
        first = self.rows[0]
        prompts = [p for r in self.rows if r.get("role") not in ISOLATED for p in r["prompts"]]
        return json.dumps([prompts, first.get("seed"), first.get("mode"), input_paths(first)])


def update(out: Path, video_format: str, rows: list[dict] | None = None) -> Path:
    """`sample()`'s hook: the web copies of `rows` (a unit's, just recorded; None: every row of the finished job,
    so a copy an interruption left out is made too), then index.html from every row recorded so far."""
    job = read_job(out)
    make_copies(out, job.rows if rows is None else rows, video_format)
    return write_page(out / PAGE, [job])


def read_job(folder: Path, label: str | None = None) -> Job:
    """A job folder's rows: samples.jsonl once finished, else the records of its finished units (in job order)."""
    samples, record = folder / "samples.jsonl", folder / RECORD
    if samples.is_file():
        rows = [_json(line, samples) for line in samples.read_text().splitlines() if line.strip()]
    elif record.is_dir():
        units = sorted(p for p in record.glob("*.json") if p.name != "job.json")
        rows = sorted((row for p in units for row in _json(p.read_text(), p)), key=lambda r: r["file"])
    else:
        raise NotFound(f"{folder} holds no samples.jsonl (nor an unfinished job's {RECORD}/): give a sampling "
                       "job's output folder")
    if not all(isinstance(r, dict) and isinstance(r.get("file"), str) and isinstance(r.get("prompts"), list)
               for r in rows):
        raise BadInput(f"{samples}: every row needs 'file' (the mp4) and 'prompts' (a list), as sample.py writes them")
    return Job(label or folder.name, folder, rows, samples.is_file())


def make_copies(out: Path, rows: list[dict], video_format: str) -> None:
    """What the page plays that the job did not write: each video's web copy (video_format=both) and each input
    (an edit's or video-to-video's video, an image-to-video's image) in web/. Existing copies are kept."""
    check_video_format(video_format)
    for row in rows:
        target = web_copy(out, row["file"])
        if video_format == "both" and not target.exists():
            write_web_copy(out / row["file"], target)
        for kind, path in input_paths(row):
            copies = input_copies(out, path)
            if Path(path).is_file() and not any(c.exists() for c in copies):
                if kind == "video" and video_format == "both":
                    write_web_copy(Path(path), copies[0])
                else:
                    with atomic_path(copies[1]) as tmp:
                        shutil.copyfile(path, tmp)


def input_paths(row: dict) -> list[tuple[str, str]]:
    """[(kind, path)] of the video's inputs as sample.py gave them: "image" and/or "video"."""
    inputs = row.get("inputs") or {}
    return [(kind, str(inputs[kind])) for kind in ("image", "video") if inputs.get(kind)]


def input_copies(out: Path, path: str) -> tuple[Path, Path]:
    """Where an input is copied: (its web copy, its copy as it is), named by its name and a hash of its path."""
    name = f"input-{Path(path).stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    return out / WEB / f"{name}{web_encoder()[1]}", out / WEB / f"{name}{Path(path).suffix}"


def write_page(path: Path, jobs: list[Job]) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(page(jobs, path.parent))
    return path


# -- the page ----------------------------------------------------------------------------------------------

def page(jobs: list[Job], where: Path) -> str:
    """The HTML of `jobs` (one: a job's own page; several: side by side), its links relative to the folder `where`.
    A job's own page names no folder (the script titles it by the folder it is opened from): the same job in two
    folders has the same page."""
    groups: dict[str, list[Video]] = {}
    for job in jobs:
        for video in videos(job):
            groups.setdefault(video.key, []).append(video)
    several = len(jobs) > 1
    title = html.escape(" vs ".join(j.label for j in jobs)) if several else ""
    state = "; ".join((f"{html.escape(j.label)}: " if several else "") + f"{len(j.rows)} videos"
                      + ("" if j.finished else " so far (sampling)") for j in jobs)
    body = "\n".join(row_html(group, where, several) for group in groups.values())
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title><style>{CSS}</style>"
            f"</head>\n<body>\n<header><h1 id=\"title\">{title}</h1><p>{state} &middot; <span id=\"status\" "
            f"data-total=\"{body.count('<video ')}\">loading videos</span> <button id=\"play-all\">&#9654; play all "
            f"from the start</button></p></header>\n{body}\n<script>{SCRIPT}</script>\n</body></html>\n")


def videos(job: Job) -> list[Video]:
    """The job's videos in job order, a pair's target with its source, isolated videos with their long video."""
    by_stem = {Path(r["file"]).stem: r for r in job.rows}
    found: dict[str, Video] = {}
    for row in job.rows:
        stem, role = Path(row["file"]).stem, row.get("role")
        if role == "target" and stem.removesuffix("_target") in by_stem:
            continue
        if role in ISOLATED and stem.rsplit("_isolated", 1)[0] in found:
            found[stem.rsplit("_isolated", 1)[0]].rows.append(row)
            continue
        found[stem] = Video(job, [row])
        if role == "source" and f"{stem}_target" in by_stem:
            found[stem].rows.append(by_stem[f"{stem}_target"])
    return list(found.values())


def row_html(group: list[Video], where: Path, several: bool) -> str:
    """One page row: the prompts, what its videos share, then the videos side by side and their maps."""
    first = group[0].rows[0]
    inputs = {(id(video.job), path): (video.job, kind, path) for video in group for kind, path in input_paths(video.rows[0])}
    made = [(video.job, row) for video in group for row in video.rows if row.get("role") not in ISOLATED]
    alone = [(video.job, row) for video in group for row in video.rows if row.get("role") in ISOLATED]
    facts = [row_facts(row) for _, row in made]
    shared = {k: v for k, v in facts[0].items() if all(f.get(k) == v for f in facts)}  # said once, on top
    html_cells = [input_cell(*i, where, several) for i in inputs.values()] + \
        [video_cell(job, row, f, shared, where, several) for (job, row), f in zip(made, facts)] + \
        [video_cell(job, row, row_facts(row), shared, where, several) for job, row in alone]  # after the controls
    prompts = all_prompts(group)
    legend = "".join(f"<li><span class=\"swatch\" style=\"background:{COLOURS[i % len(COLOURS)]}\"></span>"
                     f"{html.escape(p)}</li>" for i, p in enumerate(prompts))
    maps = map_folders(group)
    return (f"<section class=\"row\">\n<div class=\"head\"><button class=\"play\" title=\"play this row's videos "
            f"together from the start\">&#9654;</button><ol class=\"prompts\">{legend}</ol>"
            f"<p class=\"shared\">seed {first.get('seed')} &middot; {_facts_text(shared)}</p></div>\n"
            f"<div class=\"cells\">{''.join(html_cells)}</div>\n"
            + "".join(maps_html(label, folder, where) for label, folder in maps) + "</section>")


def all_prompts(group: list[Video]) -> list[str]:
    """The row's prompts in order: a multi-prompt video's P1..PK, a pair's source and target."""
    rows = [r for r in group[0].rows if r.get("role") not in ISOLATED]
    return [f"{r['role']}: {p}" if r.get("role") in ("source", "target") else p for r in rows for p in r["prompts"]]


def row_facts(row: dict) -> dict[str, str]:
    """How a video was made, as short texts by name (the page's words, not samples.jsonl's keys)."""
    facts = {"sampler": f"{row.get('sampler')}, {row.get('steps')} steps",
             "guidance": row.get("guider", "") + ("" if row.get("cfg") is None else f" {row['cfg']}"),
             "control": " ".join([str(row.get("control"))] + [f"{k}={_short(v)}" for k, v in
                                                               (row.get("control_options") or {}).items()
                                                               if k not in MAP_OPTIONS]),
             "fps": f"{row.get('fps')} fps"}
    if row.get("layout"):
        facts["layout"] = f"{row.get('frames')} latent frames; " + ", ".join(f"{k} {_short(v)}"
                                                                               for k, v in row["layout"].items())
    if row.get("cache"):
        facts["cache"] = " ".join(f"{k}={_short(v)}" for k, v in row["cache"].items())
    extra = {k: v for k, v in (row.get("inputs") or {}).items() if k not in ("image", "video")}
    facts.update({k: _short(v) for k, v in extra.items()})
    facts.update({k: _short(v) for k, v in row.items() if k not in TOLD})
    return facts


def video_cell(job: Job, row: dict, facts: dict, shared: dict, where: Path, several: bool) -> str:
    """A video: its title, the video (its web copy when there is one), the multi-prompt strip, its files and what
    sets it apart from the row's other videos."""
    file, copy = job.folder / row["file"], web_copy(job.folder, row["file"])
    role, control = row.get("role"), html.escape(str(row.get("control")))
    title = {"source": f"source &middot; {control}", "target": f"target &middot; {control}",
             "isolated": f"alone: {html.escape(row['prompts'][0])}",
             "isolated_all": "each prompt alone, in turn"}.get(role, control)
    title = f"{html.escape(job.label)} &middot; {title}" if several else title
    if not file.exists():
        return _figure(title, f"<p>{html.escape(row['file'])} is missing</p>", "missing")
    lossless = probe(file)
    links = f"<a href=\"{_src(file, where)}\">{html.escape(row['file'])}</a>" + (
        f" <a href=\"{_src(job.folder / row['latent'], where)}\">latent</a>" if row.get("latent") else "")
    own = {k: v for k, v in facts.items() if shared.get(k) != v}
    below = (f"{strip_html(row, lossless)}<p class=\"size\">{lossless.frames} frames, {lossless.width}&times;"
             f"{lossless.height} &middot; {links}</p><p class=\"own\">{_facts_text(own)}</p>")
    return _figure(title, _video(copy if copy.exists() else file, where) + below,
                   control=str(row.get("control")), role=str(role or "video"))


def input_cell(job: Job, kind: str, path: str, where: Path, several: bool) -> str:
    """An input of the row's videos (an edit's video, an image-to-video's image), from its copy in web/."""
    title = f"{html.escape(job.label)} &middot; input {kind}" if several else f"input {kind}"
    copy = next((c for c in input_copies(job.folder, path) if c.exists()), None)
    if copy is None:
        return _figure(title, f"<p>{html.escape(path)} was not found</p>", "missing")
    media = _video(copy, where) if kind == "video" else f"<img src=\"{_src(copy, where)}\" alt=\"the input image\">"
    return _figure(title, f"{media}<p class=\"size\">{html.escape(path)}</p>", role="input")


def _video(path: Path, where: Path) -> str:
    """A <video> of `path`; data-width/-height: the file's size, which the script checks against the decoded one."""
    info = probe(path)
    return (f"<video src=\"{_src(path, where)}\" data-width=\"{info.width}\" data-height=\"{info.height}\" "
            f"style=\"width:{min(480, max(256, info.width))}px\" controls muted loop playsinline preload=\"auto\">"
            "</video>")


def _figure(title: str, content: str, state: str = "", **data: str) -> str:
    attributes = "".join(f" data-{k}=\"{html.escape(v)}\"" for k, v in data.items())
    return f"<figure class=\"cell {state}\"{attributes}><figcaption>{title}</figcaption>{content}</figure>"


def segments(row: dict, pixel_frames: int) -> list[tuple[int, int, list[int], str]]:
    """A multi-prompt video's frames by prompt: [(first, end, prompts, label)] in pixel frames, from its layout
    (segment k covers latent frames starts[k]..starts[k] + tile_size; where segments overlap, both prompts)."""
    layout, T, K = row["layout"], row["frames"], len(row["prompts"])
    plan = plan_segments(K, layout.get("num_transition_blocks") or 0, layout.get("longer_mid_segment") or 0)
    starts = segment_starts(len(plan), layout["tile_size"], layout["overlap_size"])
    r = (pixel_frames - 1) / (T - 1) if T > 1 and pixel_frames != T else 1  # the VAE's temporal compression

    def pixel(t: int) -> int:  # the first pixel frame of latent frame t (a causal VAE: 1, then r per latent)
        return pixel_frames if t >= T else round(t * r if r == 1 else (0 if t == 0 else (t - 1) * r + 1))

    edges = sorted({min(T, e) for s in starts for e in (s, s + layout["tile_size"])})
    out = []
    for a, b in zip(edges, edges[1:]):
        prompts = sorted({i for k, s in enumerate(starts) if s <= a < s + layout["tile_size"]
                          for i in (plan[k].a, plan[k].b)})
        if out and out[-1][2] == prompts:  # the same prompts on: one stretch
            out[-1] = (out[-1][0], pixel(b), prompts, out[-1][3])
        else:
            out.append((pixel(a), pixel(b), prompts, " + ".join(f"P{i + 1}" for i in prompts)))
    return out


def strip_html(row: dict, info) -> str:
    """The bar under a multi-prompt video: which frames belong to which prompt, and a playhead."""
    if not row.get("layout") or len(row["prompts"]) < 2 or not row.get("frames"):
        return ""
    parts = []
    for first, end, prompts, label in segments(row, info.frames):
        colours = [COLOURS[i % len(COLOURS)] for i in prompts]
        fill = colours[0] if len(colours) == 1 else f"linear-gradient(90deg,{','.join(colours)})"
        seconds = f"{first / info.fps:.2f}-{end / info.fps:.2f} s" if info.fps else ""
        parts.append(f"<span class=\"seg\" style=\"left:{100 * first / info.frames:.3f}%;width:"
                     f"{100 * (end - first) / info.frames:.3f}%;background:{fill}\" title=\"frames {first}-{end - 1} "
                     f"({seconds}): {html.escape(label)}\">{html.escape(label)}</span>")
    return f"<div class=\"strip\" data-frames=\"{info.frames}\">{''.join(parts)}<span class=\"playhead\"></span></div>"


def map_folders(group: list[Video]) -> list[tuple[str, Path]]:
    """The folders of attention maps and masks the row's videos wrote (each once)."""
    found = {}
    for video in group:
        for row in video.rows:
            for option in MAP_OPTIONS:
                given = (row.get("control_options") or {}).get(option)
                folder = given and _find_folder(video.job.folder, Path(given))
                if folder is not None and folder not in found:
                    found[folder] = ("attention maps" if option == "out_dir" else "masks") + f" of {row['control']}"
    return [(label, folder) for folder, label in found.items()]


def maps_html(label: str, folder: Path, where: Path) -> str:
    images = sorted(folder.rglob("*.png"))
    shown = "".join(f"<figure><a href=\"{_src(p, where)}\"><img loading=\"lazy\" src=\"{_src(p, where)}\" alt=\"\">"
                    "</a><figcaption>"
                    f"{html.escape(str(p.relative_to(folder).with_suffix('')))}</figcaption></figure>"
                    for p in images[:MAX_MAPS])
    more = f"<p>and {len(images) - MAX_MAPS} more in {html.escape(str(folder))}</p>" if len(images) > MAX_MAPS else ""
    return (f"<details class=\"maps\"><summary>{html.escape(label)}: {len(images)} images in "
            f"{html.escape(_rel(folder, where))}</summary><div class=\"images\">{shown}</div>{more}</details>")


def _find_folder(job: Path, given: Path) -> Path | None:
    """A folder a control wrote, as recorded (relative to where sample.py ran) or by its place in the job folder."""
    for candidate in (given, job / "attn_map" / given.name, job / given.name):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _facts_text(facts: dict[str, str]) -> str:
    return " &middot; ".join(f"<span class=\"fact\"><b>{html.escape(k)}</b> {html.escape(v)}</span>"
                             for k, v in facts.items())


def _short(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _rel(path: Path, where: Path) -> str:
    return Path(os.path.relpath(path.resolve(), where.resolve())).as_posix()


def _src(path: Path, where: Path) -> str:
    return html.escape(quote(_rel(path, where)))


def _json(text: str, path: Path):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInput(f"{path} is not valid JSON ({err}): not a sampling job's record") from None


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f2;color:#222}
header{padding:12px 20px;background:#222;color:#eee;position:sticky;top:0;z-index:2}
header h1{font-size:18px;margin:0 0 4px}header p{margin:0}
button{cursor:pointer;border:1px solid #888;border-radius:4px;background:#fff;padding:2px 8px}
#status.failed{color:#ff8a80;font-weight:bold}
.row{margin:14px 20px;padding:10px 12px;background:#fff;border-radius:6px;box-shadow:0 1px 3px #0002}
.head{display:flex;gap:10px;align-items:flex-start;flex-wrap:wrap}
.prompts{margin:0;padding-left:22px;flex:1 1 300px;font-weight:600}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
.shared{margin:4px 0;color:#555;flex-basis:100%;font-size:12px}
.cells{display:flex;flex-wrap:nowrap;gap:12px;overflow-x:auto;padding-top:6px}
.cell{margin:0;flex:0 0 auto;display:flex;flex-direction:column;width:min-content}
.cell figcaption{font-weight:600;margin-bottom:2px;white-space:nowrap}
.cell img{width:256px}
.cell video,.cell img{display:block;image-rendering:pixelated;background:#000;border-radius:3px}
.cell.missing,.cell.failed{outline:2px solid #c62828}
.size,.own{margin:2px 0;font-size:12px;color:#555;overflow-wrap:anywhere}
.own .fact b{color:#b45309}
.strip{position:relative;height:18px;margin-top:3px;background:#ddd;border-radius:3px;overflow:hidden}
.seg{position:absolute;top:0;bottom:0;font-size:11px;line-height:18px;text-align:center;color:#fff;
 text-shadow:0 0 2px #000;overflow:hidden;white-space:nowrap;box-shadow:inset -1px 0 #fff8}
.playhead{position:absolute;top:0;bottom:0;width:2px;left:0;background:#000}
.maps summary{cursor:pointer;color:#555;margin-top:6px}
.images{display:flex;flex-wrap:wrap;gap:6px}
.images figure{margin:0;font-size:10px;color:#666}
.images img{display:block;height:64px;max-width:320px;object-fit:contain;image-rendering:pixelated}
"""

# A job's own page is titled by its folder; each <video> reports its decoded size in data-video-width/-height (data-error when the browser cannot play it),
# the header counts them, and a bar's playhead follows its video.
SCRIPT = """
const title=document.getElementById('title');
if(!title.textContent){const parts=decodeURIComponent(location.pathname).split('/');
 title.textContent=document.title=parts[parts.length-2]||'sampling job';}
const videos=[...document.querySelectorAll('video')],status=document.getElementById('status');
let loaded=0,failed=0;
function report(){status.dataset.loaded=loaded;status.dataset.failed=failed;
 status.textContent=failed?failed+' of '+videos.length+' videos cannot play in this browser (open the mp4 links)':
 loaded+' of '+videos.length+' videos loaded';status.classList.toggle('failed',failed>0);
 if(loaded+failed===videos.length)document.body.dataset.videosDone='true';}
function ready(v){v.dataset.videoWidth=v.videoWidth;v.dataset.videoHeight=v.videoHeight;
 v.dataset.readyState=v.readyState;loaded++;report();}
function broken(v){v.dataset.error=v.error?v.error.code:'unknown';v.closest('figure').classList.add('failed');
 failed++;report();}
for(const v of videos){
 if(v.error)broken(v);else if(v.readyState>=1)ready(v);
 else{v.addEventListener('loadedmetadata',()=>ready(v),{once:true});v.addEventListener('error',()=>broken(v),{once:true});}
 const head=v.parentElement.querySelector('.playhead');
 if(head)v.addEventListener('timeupdate',()=>{head.style.left=(100*v.currentTime/(v.duration||1))+'%';});
}
function together(list){for(const v of list){v.pause();v.currentTime=0;}for(const v of list)v.play();}
for(const row of document.querySelectorAll('.row'))
 row.querySelector('.play').addEventListener('click',()=>together(row.querySelectorAll('.cells video')));
document.getElementById('play-all').addEventListener('click',()=>together(videos));
report();
"""
