"""VideoFolder: both layouts, frame sampling at a target fps, resize + crop, unreadable videos, errors."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from vdm.data.video_folder import VideoFolder
from vdm.data.video_io import write_mp4

H, W = 24, 40


def indexed_clip(num_frames: int = 40, height: int = H, width: int = W) -> np.ndarray:
    """uint8 (T, H, W, 3): red = 5 * frame index everywhere; green and blue a gradient moving right."""
    t, y, x = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing="ij")
    return np.stack([5 * t, (8 * x + 4 * t) % 256, 8 * y % 256], axis=-1).astype(np.uint8)


def frame_indices(video: torch.Tensor) -> list[int]:
    """Source frame index of each returned frame, read back from the red channel."""
    red = (video[:, 0] + 1) * 127.5 / 5  # (T, H, W)
    assert torch.allclose(red, red.round(), atol=1e-3)
    assert (red == red[:, :1, :1]).all()  # one index per frame
    return red[:, 0, 0].round().long().tolist()


def cogvideox_folder(root: Path, clips: dict[str, np.ndarray | None], fps: float = 8) -> Path:
    """prompts.txt + videos.txt; a None clip is listed but not written (a missing file)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, frames in clips.items():
        if frames is not None:
            write_mp4(root / "videos" / f"{name}.mp4", frames, fps=fps)
    (root / "prompts.txt").write_text("".join(f"caption of {name}\n" for name in clips))
    (root / "videos.txt").write_text("".join(f"videos/{name}.mp4\n" for name in clips))
    return root


def test_cogvideox_layout_reads_frames_exactly(tmp_path):
    clip = indexed_clip()
    root = cogvideox_folder(tmp_path / "data", {"a": clip, "b": clip[::-1].copy()})
    ds = VideoFolder(root, num_frames=9, height=H, width=W, fps=8)
    assert ds.layout == "cogvideox" and len(ds) == 2 and not ds.unreadable
    item = ds[1]
    assert set(item) == {"mp4", "txt"} and item["txt"] == "caption of b"
    video = item["mp4"]
    assert video.shape == (9, 3, H, W) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    expected = torch.from_numpy(clip[::-1][:9].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(video, expected, atol=1e-6)  # same size: no resampling, exact pixels


def test_jsonl_layouts_metadata_and_named_file(tmp_path):
    clip = indexed_clip()
    root = tmp_path / "data"
    write_mp4(root / "clips" / "x.mp4", clip)
    (root / "metadata.jsonl").write_text(json.dumps({"caption": "a clip", "video": "clips/x.mp4"}) + "\n\n")
    ds = VideoFolder(root, num_frames=5, height=H, width=W)
    assert ds.layout == "jsonl" and len(ds) == 1
    assert ds[0]["txt"] == "a clip" and ds[0]["mp4"].shape == (5, 3, H, W)

    named = root / "train.jsonl"
    named.write_text(json.dumps({"text": "other", "path": "clips/x.mp4"}) + "\n")
    ds = VideoFolder(named, num_frames=5, height=H, width=W, caption_key="text", video_key="path",
                     input_key="video", text_key="caption")
    assert set(ds[0]) == {"video", "caption"} and ds[0]["caption"] == "other"
    with pytest.raises(ValueError, match=r"train.jsonl:1 has no key 'caption' \(keys: \['path', 'text'\]\)"):
        VideoFolder(named, num_frames=5, height=H, width=W)


@pytest.mark.parametrize("source_fps, fps, expected", [
    (24, 8, [0, 3, 6, 9, 12, 15, 18, 21, 24]),   # every third frame
    (24, 10, [0, 2, 4, 7, 9, 12, 14, 16, 19]),   # floor(i * 2.4): the frame on screen at i/10 s
    (8, 12, [0, 0, 1, 2, 2, 3, 4, 4, 5]),        # a slower clip repeats frames
])
def test_frames_are_sampled_at_the_target_fps(tmp_path, source_fps, fps, expected):
    root = cogvideox_folder(tmp_path / "data", {"a": indexed_clip()}, fps=source_fps)
    video = VideoFolder(root, num_frames=9, height=H, width=W, fps=fps)[0]["mp4"]
    assert frame_indices(video) == expected


def test_resize_covers_then_centre_crops(tmp_path):
    # a wide clip: red and blue bands at the sides, green in the middle; a square crop keeps only green
    wide = np.zeros((12, H, W, 3), np.uint8)
    wide[..., 1] = 255
    wide[:, :, :6] = (255, 0, 0)
    wide[:, :, -6:] = (0, 0, 255)
    # a tall clip (W x H): the bands are at the top and bottom
    tall = np.ascontiguousarray(wide.transpose(0, 2, 1, 3))
    root = cogvideox_folder(tmp_path / "data", {"wide": wide, "tall": tall})
    ds = VideoFolder(root, num_frames=9, height=16, width=16)
    for i in range(2):
        video = ds[i]["mp4"]
        assert video.shape == (9, 3, 16, 16)
        green = torch.tensor([-1.0, 1.0, -1.0]).view(1, 3, 1, 1)
        assert torch.allclose(video, green.expand_as(video), atol=1e-5)
    # a different aspect ratio than the target, scaled up: every pixel still in range
    video = VideoFolder(root, num_frames=9, height=36, width=48)[1]["mp4"]
    assert video.shape == (9, 3, 36, 48) and video.min() >= -1 and video.max() <= 1


def test_unreadable_videos_are_skipped_and_counted(tmp_path, caplog):
    clip = indexed_clip()
    clips = {"a": clip, "b": clip, "c": clip, "corrupt": None, "missing": None, "short": clip[:8]}
    root = cogvideox_folder(tmp_path / "data", clips)
    (root / "videos" / "corrupt.mp4").write_bytes(b"not an mp4 at all" * 50)
    with caplog.at_level(logging.WARNING, logger="vdm.data.video_folder"):
        ds = VideoFolder(root, num_frames=9, height=H, width=W, fps=8, max_unreadable_fraction=0.5)
    assert len(ds) == 3 and [ds[i]["txt"] for i in range(3)] == ["caption of a", "caption of b", "caption of c"]
    reasons = {path.name: reason for path, reason in ds.unreadable}
    assert set(reasons) == {"corrupt.mp4", "missing.mp4", "short.mp4"}
    assert reasons["missing.mp4"] == "missing"
    assert reasons["corrupt.mp4"].startswith("not readable")
    assert reasons["short.mp4"].startswith("too short: 1 s, 9 frames at 8 fps")
    assert f"3 of 6 videos unreadable: first: {root / 'videos' / 'corrupt.mp4'} (not readable" in caplog.text


def test_too_many_unreadable_videos_are_refused(tmp_path):
    root = cogvideox_folder(tmp_path / "data", {"a": indexed_clip(), "gone": None, "gone2": None})
    with pytest.raises(ValueError, match=r"2 of 3 videos unreadable, more than max_unreadable_fraction=0.5; "
                                         r"first: .*gone.mp4 \(missing\)"):
        VideoFolder(root, num_frames=9, height=H, width=W)
    assert len(VideoFolder(root, num_frames=9, height=H, width=W, max_unreadable_fraction=0.7)) == 1


def test_errors_name_the_problem(tmp_path):
    root = cogvideox_folder(tmp_path / "data", {"gone": None, "gone2": None})
    with pytest.raises(ValueError, match=r"no readable video \(2 listed, e.g. .*gone.mp4: missing\)"):
        VideoFolder(root, num_frames=9, height=H, width=W)
    # a clip too short at the target fps: 40 frames at 8 fps are 5 s; 9 frames at 1 fps need 8 s
    short = cogvideox_folder(tmp_path / "short", {"a": indexed_clip()})
    with pytest.raises(ValueError, match=r"no readable video .*too short: 5 s, 9 frames at 1 fps need more than 8 s"):
        VideoFolder(short, num_frames=9, height=H, width=W, fps=1)
    with pytest.raises(ValueError, match=r"num_frames=10 must be 4k\+1 .*1, 5, 9, 13, \.\.\., 49"):
        VideoFolder(short, num_frames=10)

    (short / "prompts.txt").write_text("one\ntwo\nthree\n")
    with pytest.raises(ValueError, match=r"prompts.txt has 3 non-blank lines but .*videos.txt has 1"):
        VideoFolder(short, num_frames=9, height=H, width=W)
    (short / "videos.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"needs both prompts.txt and videos.txt; missing: videos.txt"):
        VideoFolder(short, num_frames=9, height=H, width=W)
    with pytest.raises(FileNotFoundError, match=r"holds neither prompts.txt \+ videos.txt .* nor metadata.jsonl"):
        VideoFolder(tmp_path / "short" / "videos")
    with pytest.raises(ValueError, match=r"layout='csv'; valid: auto, cogvideox, jsonl"):
        VideoFolder(short, layout="csv")
