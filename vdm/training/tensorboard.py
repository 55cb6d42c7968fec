"""TensorBoard: a writer for scalars, text and videos (animated GIFs, encoded with Pillow, no moviepy), and
the per-window training scalars (`StepMeter`)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(T, C, H, W) in [-1, 1] -> (T, H, W, C) uint8."""
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).cpu().numpy()


def video_grid(videos: torch.Tensor) -> np.ndarray:
    """(B, T, C, H, W) in [-1, 1] -> one row of clips, (T, H, B·W, C) uint8."""
    return np.concatenate([to_uint8_frames(v) for v in videos], axis=2)


def gif_bytes(frames: np.ndarray, fps: int = 8) -> bytes:
    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buffer.getvalue()


class TensorBoard:
    def __init__(self, log_dir: Path):
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, lines: list[str], step: int) -> None:
        self.writer.add_text(tag, "\n\n".join(lines), step)

    def video(self, tag: str, videos: torch.Tensor, step: int, fps: int = 8) -> None:
        """Videos (B, T, C, H, W) in [-1, 1], shown side by side as one animated image."""
        frames = video_grid(videos)
        T, H, W, C = frames.shape
        image = Summary.Image(height=H, width=W, colorspace=C, encoded_image_string=gif_bytes(frames, fps))
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def close(self) -> None:
        self.writer.close()


class StepMeter:
    """The scalars of the steps since the last log line: mean loss over the finite ones, the last gradient
    norm, samples per second, and the run's skipped steps so far."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.steps, self.grad_norm, self.start = 0, float("nan"), time.perf_counter()

    def add(self, loss: float, grad_norm: float, applied: bool) -> None:
        self.steps += 1
        self.grad_norm = grad_norm
        if applied:
            self.losses.append(loss)

    def scalars(self, lr: float, skipped_steps: int) -> dict[str, float]:
        """The window's scalars (then a new window starts); no loss when every step in it was skipped."""
        out = {"train/loss": sum(self.losses) / len(self.losses)} if self.losses else {}
        out.update({"train/lr": lr, "train/grad_norm": self.grad_norm, "train/skipped_steps": float(skipped_steps),
                    "train/samples_per_sec": self.steps * self.samples_per_step / (time.perf_counter() - self.start)})
        self.reset()
        return out
