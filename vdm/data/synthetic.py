"""The built-in synthetic world: one coloured square or circle sliding across a black frame.

Every clip is 9 frames of 32x32 RGB; a 10 px shape in one of 4 colours moves 2 px per frame in one
of 4 directions, from a random start that keeps its whole path inside the frame. The caption
"a {colour} {shape} moving {direction}" names all three facts, so a model trained on the world
can be scored by reading its samples back (`vdm.eval.synthetic`). Items are drawn from
`np.random.default_rng((seed, index))`: no files, deterministic per seed and index.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset

from vdm.errors import BadInput

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
SHAPES: tuple[str, ...] = ("square", "circle")
# Unit steps (dx, dy) in image coordinates: y grows downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
CAPTION_FORM = "a {colour} {shape} moving {direction}"
CAPTIONS: tuple[str, ...] = tuple(
    CAPTION_FORM.format(colour=c, shape=s, direction=d) for c in COLOURS for s in SHAPES for d in DIRECTIONS
)


def parse_caption(text: str) -> tuple[str, str, str]:
    """Split a world caption into (colour, shape, direction); case, spacing and a final '.' are ignored."""
    words = text.strip().rstrip(".").lower().split()
    if (len(words) == 5 and words[0] == "a" and words[1] in COLOURS and words[2] in SHAPES
            and words[3] == "moving" and words[4] in DIRECTIONS):
        return words[1], words[2], words[4]
    raise BadInput(
        f"caption {text!r} is not of the form '{CAPTION_FORM}' with colour in {list(COLOURS)}, "
        f"shape in {list(SHAPES)}, direction in {list(DIRECTIONS)}"
    )


def shape_mask(shape: str, shape_size: int = 10) -> np.ndarray:
    """Boolean (shape_size, shape_size) footprint: the full box, or the disc inscribed in it."""
    if shape == "square":
        return np.ones((shape_size, shape_size), dtype=bool)
    if shape == "circle":
        # Pixel centres within radius shape_size/2 of the box centre.
        c = np.arange(shape_size) + 0.5 - shape_size / 2
        return c[:, None] ** 2 + c[None, :] ** 2 <= (shape_size / 2) ** 2
    raise BadInput(f"shape {shape!r} is not one of {list(SHAPES)}")


def start_range(
    direction: str, num_frames: int = 9, size: int = 32, shape_size: int = 10, speed: int = 2
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Inclusive ranges ((x_lo, x_hi), (y_lo, y_hi)) of top-left starts whose whole path stays inside."""
    if direction not in DIRECTIONS:
        raise BadInput(f"direction {direction!r} is not one of {list(DIRECTIONS)}")
    travel = speed * (num_frames - 1)
    ranges = []
    for step in DIRECTIONS[direction]:
        lo, hi = 0, size - shape_size
        if step > 0:
            hi -= travel
        elif step < 0:
            lo += travel
        ranges.append((lo, hi))
    if any(lo > hi for lo, hi in ranges):
        raise BadInput(
            f"no start keeps a {shape_size} px shape inside a {size} px frame over {num_frames} frames at "
            f"speed {speed}: need shape_size + speed*(num_frames-1) <= size"
        )
    return ranges[0], ranges[1]


def render_clip(
    colour: str,
    shape: str,
    direction: str,
    start: tuple[int, int],
    num_frames: int = 9,
    size: int = 32,
    shape_size: int = 10,
    speed: int = 2,
) -> np.ndarray:
    """Render one clip as uint8 (T, H, W, 3); `start` is the shape box's top-left (x, y) in frame 0."""
    if colour not in COLOURS:
        raise BadInput(f"colour {colour!r} is not one of {list(COLOURS)}")
    mask = shape_mask(shape, shape_size)
    (x_lo, x_hi), (y_lo, y_hi) = start_range(direction, num_frames, size, shape_size, speed)
    x0, y0 = int(start[0]), int(start[1])
    if not (x_lo <= x0 <= x_hi and y_lo <= y0 <= y_hi):
        raise BadInput(
            f"start {tuple(start)} takes a shape moving {direction} out of the frame: valid x in "
            f"[{x_lo}, {x_hi}], y in [{y_lo}, {y_hi}]"
        )
    dx, dy = DIRECTIONS[direction]
    patch = mask[:, :, None] * np.asarray(COLOURS[colour], dtype=np.uint8)  # (s, s, 3)
    frames = np.zeros((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        x, y = x0 + dx * speed * t, y0 + dy * speed * t
        frames[t, y:y + shape_size, x:x + shape_size] = patch
    return frames


class SyntheticWorld(Dataset):
    """`length` procedurally generated clips; item i is a fixed function of (seed, i).

    Each item draws, from `np.random.default_rng((seed, i))`, a caption uniformly from `CAPTIONS`
    and then a uniformly random start whose path stays inside the frame. `__getitem__` returns
    `{"mp4": float32 (T, 3, H, W) in [-1, 1], "txt": caption}`.
    """

    def __init__(
        self,
        length: int = 100_000,
        seed: int = 0,
        num_frames: int = 9,
        size: int = 32,
        shape_size: int = 10,
        speed: int = 2,
    ):
        if length < 1:
            raise BadInput(f"length must be >= 1, got {length}")
        if seed < 0:
            raise BadInput(f"seed must be >= 0 (numpy seeds are non-negative), got {seed}")
        self.length = length
        self.seed = seed
        self.num_frames = num_frames
        self.size = size
        self.shape_size = shape_size
        self.speed = speed
        # Fails here, with the valid condition, when the geometry leaves no room to move.
        self._ranges = {d: start_range(d, num_frames, size, shape_size, speed) for d in DIRECTIONS}

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is outside [0, {self.length})")
        return np.random.default_rng((self.seed, index))

    def caption_of(self, index: int) -> str:
        """The caption of item `index` without rendering it."""
        return CAPTIONS[int(self._rng(index).integers(len(CAPTIONS)))]

    def spec(self, index: int) -> tuple[str, tuple[int, int]]:
        """(caption, start (x, y)) of item `index`."""
        rng = self._rng(index)
        caption = CAPTIONS[int(rng.integers(len(CAPTIONS)))]
        (x_lo, x_hi), (y_lo, y_hi) = self._ranges[parse_caption(caption)[2]]
        x, y = rng.integers((x_lo, y_lo), (x_hi + 1, y_hi + 1))
        return caption, (int(x), int(y))

    def render(self, index: int) -> tuple[np.ndarray, str]:
        """(uint8 frames (T, H, W, 3), caption) of item `index`."""
        caption, start = self.spec(index)
        colour, shape, direction = parse_caption(caption)
        frames = render_clip(colour, shape, direction, start, self.num_frames, self.size, self.shape_size,
                             self.speed)
        return frames, caption

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        frames, caption = self.render(index)
        video = rearrange(torch.from_numpy(frames), "t h w c -> t c h w").float() / 127.5 - 1.0
        return {"mp4": video, "txt": caption}
