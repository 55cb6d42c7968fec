"""Non-finite values. A step whose loss or gradient norm is NaN or Inf updates nothing (no optimizer,
scheduler or EMA step) and is counted; `nan_tolerance` of them in a row stop the run. Weights that are not
finite never reach a checkpoint."""

from __future__ import annotations

import logging

import torch

from vdm.errors import UserError
from vdm.runs import Progress
from vdm.training.parallel import local_tensor

log = logging.getLogger(__name__)


class TrainingDiverged(UserError, ValueError):
    """The run produced values it cannot recover from; the message is one line naming the step."""


class NaNGuard:
    def __init__(self, tolerance: int):
        self.tolerance = tolerance

    def count(self, progress: Progress, finite: bool) -> None:
        """Record whether step `progress.step` was finite (it was skipped if not)."""
        if finite:
            progress.skips_in_a_row = 0
            return
        progress.skipped_steps += 1
        progress.skips_in_a_row += 1
        log.warning("step %d: loss or gradient norm not finite; step skipped (%d in a row, nan_tolerance=%d)",
                    progress.step, progress.skips_in_a_row, self.tolerance)

    def check(self, progress: Progress) -> None:
        """Stop the run after `tolerance` skipped steps in a row."""
        if progress.skips_in_a_row >= self.tolerance:
            raise TrainingDiverged(
                f"step {progress.step}: loss or gradient norm not finite for {progress.skips_in_a_row} steps in a "
                f"row (nan_tolerance={self.tolerance}); stopped without saving, the weights are those of the last "
                f"finite step. Check the data before data position {progress.data_position}, lower optim.lr or "
                "set clip_grad_norm")


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or Inf in this process's part of it, or None."""
    for name, t in tensors.items():
        t = local_tensor(t)
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None
