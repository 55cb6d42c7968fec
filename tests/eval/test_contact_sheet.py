"""The contact sheet: one row of frames per sampled video, never written over an existing file."""

import json

import numpy as np
from PIL import Image

from vdm.data.synthetic import render_clip
from vdm.data.video_io import write_mp4
from vdm.eval.contact_sheet import main


def test_contact_sheet_rows_hold_the_frames(tmp_path):
    clips = [render_clip("red", "square", "right", (2, 11)), render_clip("blue", "circle", "down", (11, 2))]
    for i, clip in enumerate(clips):
        write_mp4(tmp_path / f"v{i}.mp4", clip)
    (tmp_path / "samples.jsonl").write_text("".join(
        json.dumps({"file": f"v{i}.mp4", "prompts": ["p"]}) + "\n" for i in range(2)))
    assert main([str(tmp_path), str(tmp_path / "sheet.png"), "--scale", "2"]) == 0
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    assert sheet.shape == (2 * (64 + 12 + 2), 9 * (64 + 2), 3)
    first = sheet[12:12 + 64, 0:64]  # row 0, frame 0, scaled by 2
    np.testing.assert_array_equal(first[::2, ::2], clips[0][0])
    assert main([str(tmp_path), str(tmp_path / "sheet.png")]) == 1  # never overwritten
