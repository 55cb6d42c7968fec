"""One training step: forward and backward over the micro-batches, the gradient norm over all processes,
clipping by it, and the update — or none when the loss or the gradient norm is not finite."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from vdm.training.parallel import DataParallel
from vdm.training.state import TrainState


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over processes and micro-batches
    grad_norm: float  # of all gradients together, before clipping
    applied: bool  # False: the loss or the gradient norm was not finite and nothing was updated


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Scale the gradients so that their joint L2 norm is at most `max_norm` (None: leave them), and return
    that norm before clipping. Under FSDP it is the global norm over every shard, not each shard's own, so
    the update equals a single process's."""
    parameters = list(parameters)
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def train_step(model: nn.Module, engine: nn.Module, state: TrainState, batches: Sequence[dict],
               parallel: DataParallel, clip_grad_norm: float | None, loss_fn=None) -> StepResult:
    """Accumulate gradients over `batches` (one per micro-step; the gradient reduction runs on the last),
    then update the optimizer, scheduler and EMA if the loss and the gradient norm are finite. `loss_fn`:
    this step's loss (a distillation round's), the engine's own when None."""
    step_loss = torch.zeros((), device=parallel.device)
    for i, batch in enumerate(batches):
        with parallel.no_sync(model, sync=i == len(batches) - 1):
            x, batch = engine.prepare_batch(batch)  # first-stage encode, no grad
            with parallel.autocast():
                loss, _ = model(x, batch, loss_fn=loss_fn)
            parallel.backward(loss / len(batches))
        step_loss += loss.detach() / len(batches)
    loss = parallel.mean(step_loss)
    parallel.unscale_gradients()
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    grad_norm = clip_grad_norm_(params, clip_grad_norm)
    applied = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if applied:
        state.optimizer.step()
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update()
    else:
        parallel.skip_update()
    state.optimizer.zero_grad(set_to_none=True)
    return StepResult(float(loss), float(grad_norm), applied)
