import numpy as np
import pytest

from vdm.data import video_io
from vdm.data.synthetic import render_clip
from vdm.data.video_io import read_mp4, write_mp4


def test_the_preferred_encoder_is_available():
    assert video_io.choose_encoder()[0] == "libx264rgb"


def test_world_clip_round_trips_exactly(tmp_path):
    frames = np.concatenate([render_clip(c, "circle", "down", (5, 0)) for c in ("red", "green", "blue", "yellow")])
    path = write_mp4(tmp_path / "clip.mp4", frames)
    back = read_mp4(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.array_equal(back, frames)


@pytest.mark.parametrize("size", [(32, 32), (31, 33)])
def test_arbitrary_pixels_round_trip(tmp_path, size):
    # libx264rgb (and png) are exact; the yuv444p fallback loses only RGB <-> YUV rounding (measured max 2).
    frames = np.random.default_rng(0).integers(0, 256, (5, *size, 3), dtype=np.uint8)
    back = read_mp4(write_mp4(tmp_path / "noise.mp4", frames))
    assert back.shape == frames.shape
    diff = np.abs(back.astype(int) - frames)
    tolerance = 0 if video_io.choose_encoder()[0] in video_io.EXACT_ENCODERS else 2
    assert diff.max() <= tolerance and diff.mean() <= tolerance / 4


def test_existing_file_is_refused_unless_overwrite(tmp_path):
    a = render_clip("red", "square", "left", (20, 3))
    b = render_clip("blue", "square", "left", (20, 3))
    path = write_mp4(tmp_path / "clip.mp4", a)
    with pytest.raises(FileExistsError, match=f"{path} already exists; pass overwrite=True"):
        write_mp4(path, b)
    assert np.array_equal(read_mp4(path), a)
    write_mp4(path, b, overwrite=True)
    assert np.array_equal(read_mp4(path), b)


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    frames = render_clip("green", "square", "up", (3, 20))
    old = write_mp4(tmp_path / "old.mp4", frames)
    calls = []
    real = video_io.av.VideoFrame.from_ndarray

    def fail_on_third(array, format):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("encoder died")
        return real(array, format=format)

    monkeypatch.setattr(video_io.av.VideoFrame, "from_ndarray", fail_on_third)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_mp4(tmp_path / "new.mp4", frames)
    calls.clear()
    with pytest.raises(RuntimeError, match="encoder died"):
        write_mp4(old, frames[::-1], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.mp4"]
    monkeypatch.undo()
    assert np.array_equal(read_mp4(old), frames)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4 does not exist"):
        read_mp4(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 20)
    with pytest.raises(ValueError, match="junk.mp4 is not a readable video"):
        read_mp4(tmp_path / "junk.mp4")
    with pytest.raises(ValueError, match=r"uint8 array \(T, H, W, 3\), got float32"):
        write_mp4(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="must end in .mp4"):
        write_mp4(tmp_path / "x.avi", np.zeros((2, 8, 8, 3), np.uint8))
