import time

import numpy as np
import pytest
import torch

from vdm.data.synthetic import (
    CAPTIONS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SyntheticWorld,
    parse_caption,
    render_clip,
    start_range,
)


def reference_disc_count(size: int) -> int:
    """Pixel centres within radius size/2 of the box centre, counted one by one."""
    r = size / 2
    return sum((i + 0.5 - r) ** 2 + (j + 0.5 - r) ** 2 <= r * r for i in range(size) for j in range(size))


def test_captions_cover_the_grid_in_a_fixed_order():
    assert len(CAPTIONS) == len(set(CAPTIONS)) == 32
    assert CAPTIONS[0] == "a red square moving left"
    assert {parse_caption(c) for c in CAPTIONS} == {(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS}


def test_parse_caption_tolerates_case_and_full_stop_and_refuses_others():
    assert parse_caption("  A Yellow circle moving  up. ") == ("yellow", "circle", "up")
    with pytest.raises(ValueError, match=r"'a purple square moving left'.*a \{colour\} \{shape\} moving \{direction\}"):
        parse_caption("a purple square moving left")


def test_world_is_deterministic_per_seed_and_index():
    a, b, c = SyntheticWorld(seed=0), SyntheticWorld(seed=0), SyntheticWorld(seed=1)
    for i in (0, 1, 7, 99_999):
        assert torch.equal(a[i]["mp4"], b[i]["mp4"]) and a[i]["txt"] == b[i]["txt"]
    va = torch.stack([a[i]["mp4"] for i in range(8)])
    vc = torch.stack([c[i]["mp4"] for i in range(8)])
    assert not torch.equal(va, vc)
    assert not torch.equal(a[0]["mp4"], a[1]["mp4"])


def test_items_have_the_right_layout_and_parseable_captions():
    world = SyntheticWorld(length=50, seed=3)
    for i in range(len(world)):
        item = world[i]
        video = item["mp4"]
        assert video.shape == (9, 3, 32, 32) and video.dtype == torch.float32
        assert video.min() == -1.0 and video.max() == 1.0
        parse_caption(item["txt"])
        assert world.caption_of(i) == item["txt"]
    with pytest.raises(IndexError, match=r"index 50 is outside \[0, 50\)"):
        world[50]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_render_has_the_right_shape_colour_and_motion(caption):
    colour, shape, direction = parse_caption(caption)
    (x_lo, x_hi), (y_lo, y_hi) = start_range(direction)
    start = ((x_lo + x_hi) // 2, (y_lo + y_hi) // 2)
    frames = render_clip(colour, shape, direction, start)
    assert frames.shape == (9, 32, 32, 3) and frames.dtype == np.uint8
    expected_count = 100 if shape == "square" else reference_disc_count(10)
    dx, dy = DIRECTIONS[direction]
    for t, frame in enumerate(frames):
        lit = frame.any(axis=-1)
        assert lit.sum() == expected_count
        assert (frame[lit] == COLOURS[colour]).all()
        ys, xs = np.nonzero(lit)
        # The shape's box (its bounding box, also for the disc) moves 2 px per frame.
        assert (xs.min(), ys.min()) == (start[0] + 2 * dx * t, start[1] + 2 * dy * t)
        assert xs.max() - xs.min() == ys.max() - ys.min() == 9


def test_disc_is_the_inscribed_disc():
    frames = render_clip("red", "circle", "right", (0, 0))
    assert reference_disc_count(10) == 80
    corner = frames[0, :3, :3].any(axis=-1)
    assert not corner[0, 0] and corner[1, 1] and frames[0, 0, 3:7].any(axis=-1).all()


def test_paths_stay_inside_the_frame():
    world = SyntheticWorld(seed=5)
    for i in range(1000):
        frames, caption = world.render(i)
        _, shape, _ = parse_caption(caption)
        counts = frames.any(axis=-1).sum(axis=(1, 2))
        assert (counts == (100 if shape == "square" else 80)).all(), (i, caption)
    with pytest.raises(ValueError, match=r"start \(20, 0\) takes a shape moving right out of the frame.*x in \[0, 6\]"):
        render_clip("red", "square", "right", (20, 0))


def test_all_captions_occur():
    world = SyntheticWorld(seed=0)
    seen = {world.caption_of(i) for i in range(3000)}
    assert seen == set(CAPTIONS)


def test_geometry_without_room_is_refused():
    with pytest.raises(ValueError, match="shape_size \\+ speed\\*\\(num_frames-1\\) <= size"):
        SyntheticWorld(num_frames=20)


def test_a_batch_is_fast():
    world = SyntheticWorld()
    best = float("inf")
    for k in range(5):
        start = time.perf_counter()
        torch.utils.data.default_collate([world[16 * k + i] for i in range(16)])
        best = min(best, time.perf_counter() - start)
    assert best < 0.03, f"a batch of 16 took {best * 1e3:.1f} ms"
