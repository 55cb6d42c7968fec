"""The multi-prompt evaluator: per control, do videos start and end on their prompts, hold together and
move without jumps; one table per samples folder, labelled with its layout."""

import json

import numpy as np

from vdm.data.synthetic import render_clip
from vdm.data.video_io import write_mp4
from vdm.eval.multiprompt import evaluate_multiprompt, main

PROMPTS = ["a red square moving right", "a red square moving down"]
LAYOUT = {"tile_size": 9, "overlap_size": 5, "num_transition_blocks": 2, "longer_mid_segment": 0, "segments": 4}


def write_samples(folder, jump: bool) -> None:
    right = render_clip("red", "square", "right", (2, 2))  # ends with the box at x 18, y 2
    down = render_clip("red", "square", "down", (18 if not jump else 2, 2))  # continues there, or jumps back
    rows = []
    for i, control in enumerate(("base", "kv_sharing")):
        write_mp4(folder / f"v{i}.mp4", np.concatenate([right, down]))
        rows.append({"file": f"v{i}.mp4", "prompts": PROMPTS, "adaln": control, "layout": LAYOUT})
    rows.append({"file": "v0.mp4", "prompts": PROMPTS[:1], "adaln": "base"})  # single-prompt rows are skipped
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_scores_per_control_and_names_the_layout(tmp_path, capsys):
    smooth, jumpy = tmp_path / "smooth", tmp_path / "jumpy"
    smooth.mkdir()
    jumpy.mkdir()
    write_samples(smooth, jump=False)
    write_samples(jumpy, jump=True)
    result = evaluate_multiprompt(smooth / "samples.jsonl")
    assert set(result) == {"base", "kv_sharing"} and result["base"]["count"] == 1
    assert result["base"] == {"count": 1, "first": 1.0, "last": 1.0, "holds": 1.0, "smooth": 1.0}
    assert evaluate_multiprompt(jumpy / "samples.jsonl")["base"]["smooth"] == 0.0  # a 16 px jump back
    assert main([str(smooth), str(jumpy)]) == 0
    out = capsys.readouterr().out
    assert out.count("(tile 9, overlap 5, 2 transition blocks)") == 2 and "kv_sharing" in out
