"""Step caches: training-free skipping of the DiT's blocks on sampling steps whose result the last computed step
predicts well. A cache is one video's state, made fresh for each sampling call and handed to the network in the
call context (`CallContext.cache`); the block loop asks it to run the blocks (`blocks(run, video, text, emb,
timestep)`, where `run(start, stop, video, text)` runs blocks start..stop-1), and each block asks it for its
attention output (`attention(layer, compute)`). Nothing is stored in the network's modules.

- `FirstBlockCache` (diffusers' `FirstBlockCacheConfig`, ParaAttention's first-block cache): block 0 always runs;
  when the mean absolute change of its video residual, relative to the mean absolute residual of the last fully
  computed step, is at most `threshold`, blocks 1.. are skipped and the residuals they added on that step (video
  and text streams) are added instead.
- `TeaCache` (ali-vilab/TeaCache for CogVideoX): the relative L1 change of the time embedding from the previous
  call, rescaled by the model's polynomial (`coefficients`, highest power first), is accumulated; below
  `threshold` every block is skipped and the whole stack's last residuals added; the first and the last call of a
  video are always computed.
- `PyramidAttentionBroadcast` (diffusers' `PyramidAttentionBroadcastConfig`, spatial attention: CogVideoX's joint
  attention): each layer's attention output (after its output projection, both streams) is computed on its
  first call, outside the open timestep range (lo, hi), and every `block_skip_range`-th call, and reused otherwise.

The decision is one per network call, over the whole batch (the guided pair's rows share it, as in diffusers'
pipeline); `threshold=0` computes every step and gives the uncached latents bit for bit. `evaluations` counts
the blocks run. A video sampled on several processes (its guidance branches, its token shards) has one cache on
each, given their `group`: the changes a decision reads are summed over the group, so all decide alike, as one
process would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from vdm.errors import BadInput

Run = Callable[[int, int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# TeaCache's published coefficients for CogVideoX (TeaCache4CogVideoX1.5), by the released model's variant.
TEACACHE_COEFFICIENTS = {
    "cogvideox_2b": [-3.10658903e+01, 2.54732368e+01, -5.92380459e+00, 1.75769064e+00, -3.61568434e-03],
    "cogvideox_5b": [-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02],
    "cogvideox_5b_i2v": [-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02],
    "cogvideox15_5b": [2.50210439e+02, -1.65061612e+02, 3.57804877e+01, -7.81551492e-01, 3.58559703e-02],
    "cogvideox15_5b_i2v": [1.22842302e+02, -1.04088754e+02, 2.62981677e+01, -3.06009921e-01, 3.71213220e-02],
}


class StepCache:
    """The base: runs every block (no cache). Subclasses decide per call; `steps` records each call's choice
    (True: computed) and `evaluations` the blocks run."""

    name = "none"

    def __init__(self, num_layers: int, group=None):
        self.num_layers = num_layers
        self.group = group  # the processes sampling this video with this cache (vdm.distributed.Processes)
        self.steps: list[bool] = []
        self.evaluations = 0

    def relative_change(self, change: torch.Tensor, base: torch.Tensor) -> float:
        """mean |change| / mean |base| over the video's rows and tokens (on every process of its group)."""
        if self.group is None or self.group.world_size == 1:
            return (change.abs().mean() / base.abs().mean()).item()
        sums = self.group.sum(torch.stack([change.abs().sum(), base.abs().sum()]).double())  # equal counts
        return (sums[0] / sums[1]).item()

    def counts(self) -> dict:
        """What this video's sampling computed: steps (all blocks run), calls, blocks run."""
        return {"computed_steps": sum(self.steps), "steps": len(self.steps), "block_evaluations": self.evaluations}

    def _run(self, run: Run, start: int, stop: int, video: torch.Tensor, text: torch.Tensor):
        self.evaluations += stop - start
        return run(start, stop, video, text)

    def blocks(self, run: Run, video: torch.Tensor, text: torch.Tensor, emb: torch.Tensor, timestep: float):
        self.steps.append(True)
        return self._run(run, 0, self.num_layers, video, text)

    def attention(self, layer: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return compute()


def _check_threshold(threshold: float, name: str) -> float:
    if threshold is None or float(threshold) < 0:
        raise BadInput(f"cache.threshold={threshold}: the {name} cache's threshold must be >= 0 (0: no step skipped)")
    return float(threshold)


class FirstBlockCache(StepCache):
    name = "first_block"

    def __init__(self, num_layers: int, threshold: float = 0.05, group=None):
        super().__init__(num_layers, group)
        self.threshold = _check_threshold(threshold, self.name)
        self.head_residual: torch.Tensor | None = None  # block 0's video residual on the last computed step
        self.tail: tuple[torch.Tensor, torch.Tensor] | None = None  # what blocks 1.. added then (video, text)

    def _skip(self, residual: torch.Tensor) -> bool:
        if self.head_residual is None or self.tail is None:
            return False
        return self.relative_change(residual - self.head_residual, self.head_residual) <= self.threshold

    def blocks(self, run: Run, video: torch.Tensor, text: torch.Tensor, emb: torch.Tensor, timestep: float):
        head_video, head_text = self._run(run, 0, 1, video, text)
        residual = head_video - video
        if self._skip(residual):
            self.steps.append(False)
            return head_video + self.tail[0], head_text + self.tail[1]
        self.steps.append(True)
        out_video, out_text = self._run(run, 1, self.num_layers, head_video, head_text)
        self.head_residual, self.tail = residual, (out_video - head_video, out_text - head_text)
        return out_video, out_text


class TeaCache(StepCache):
    name = "teacache"

    def __init__(self, num_layers: int, num_steps: int, threshold: float = 0.1,
                 coefficients: Sequence[float] | None = None, variant: str | None = None, group=None):
        super().__init__(num_layers, group)
        self.threshold = _check_threshold(threshold, self.name)
        if coefficients is None:
            if variant not in TEACACHE_COEFFICIENTS:
                raise BadInput(f"cache=teacache: no published coefficients for {variant or 'this model'} (they exist "
                               f"for {', '.join(TEACACHE_COEFFICIENTS)}); give cache.coefficients=[...] (highest power "
                               "first), e.g. fitted with python -m vdm.sampling.teacache_fit")
            coefficients = TEACACHE_COEFFICIENTS[variant]
        self.rescale = np.poly1d(list(coefficients))
        self.num_steps = int(num_steps)
        self.accumulated = 0.0
        self.previous_emb: torch.Tensor | None = None
        self.residual: tuple[torch.Tensor, torch.Tensor] | None = None

    def _skip(self, emb: torch.Tensor) -> bool:
        call = len(self.steps)
        # threshold 0 computes every call: the published polynomials go below 0 for tiny changes, which
        # TeaCache's rule (accumulated < threshold) would skip
        if call == 0 or call >= self.num_steps - 1 or self.residual is None or self.threshold == 0:
            self.accumulated = 0.0
            return False
        change = self.relative_change(emb - self.previous_emb, self.previous_emb)
        self.accumulated += float(self.rescale(change))
        if self.accumulated < self.threshold:
            return True
        self.accumulated = 0.0
        return False

    def blocks(self, run: Run, video: torch.Tensor, text: torch.Tensor, emb: torch.Tensor, timestep: float):
        skip = self._skip(emb)
        self.previous_emb = emb
        self.steps.append(not skip)
        if skip:
            return video + self.residual[0], text + self.residual[1]
        out_video, out_text = self._run(run, 0, self.num_layers, video, text)
        self.residual = (out_video - video, out_text - text)
        return out_video, out_text


class PyramidAttentionBroadcast(StepCache):
    name = "pab"

    def __init__(self, num_layers: int, block_skip_range: int = 2, timestep_skip_range: Sequence[int] = (100, 800),
                 group=None):
        super().__init__(num_layers, group)
        if int(block_skip_range) != block_skip_range or block_skip_range < 1:
            raise BadInput(f"cache.block_skip_range={block_skip_range} must be an integer >= 1 (1: every attention "
                           "computed)")
        if len(timestep_skip_range) != 2 or timestep_skip_range[0] > timestep_skip_range[1]:
            raise BadInput(f"cache.timestep_skip_range={list(timestep_skip_range)} must be [lo, hi] with lo <= hi")
        self.block_skip_range, self.timestep_skip_range = int(block_skip_range), tuple(timestep_skip_range)
        self.calls = [0] * num_layers
        self.outputs: list[torch.Tensor | None] = [None] * num_layers
        self.timestep: float | None = None
        self.attention_evaluations = 0

    def blocks(self, run: Run, video: torch.Tensor, text: torch.Tensor, emb: torch.Tensor, timestep: float):
        self.timestep = timestep
        self.steps.append(True)
        return self._run(run, 0, self.num_layers, video, text)

    def counts(self) -> dict:
        return {**super().counts(), "attention_evaluations": self.attention_evaluations}

    def attention(self, layer: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        lo, hi = self.timestep_skip_range
        n = self.calls[layer]
        if self.outputs[layer] is None or n == 0 or not lo < self.timestep < hi or n % self.block_skip_range == 0:
            self.outputs[layer] = compute()
            self.attention_evaluations += 1
        self.calls[layer] += 1
        return self.outputs[layer]


CACHES = {"first_block": FirstBlockCache, "teacache": TeaCache, "pab": PyramidAttentionBroadcast}
OPTIONS = {"first_block": ("threshold",), "teacache": ("threshold", "coefficients"),
           "pab": ("block_skip_range", "timestep_skip_range")}


def make_cache(name: str, options: dict, num_layers: int, num_steps: int, variant: str | None = None,
               group=None) -> StepCache:
    """A fresh cache `name` for one video of `num_steps` network calls, from its `cache.*` options; `group`: the
    processes that sample the video together."""
    if name not in CACHES:
        raise BadInput(f"cache={name!r} is unknown; valid: {', '.join(CACHES)} (or null: no cache)")
    stray = sorted(set(options) - set(OPTIONS[name]))
    if stray:
        others = [n for n, keys in OPTIONS.items() if stray[0] in keys and n != name]
        where = f" (an option of cache={others[0]})" if others else ""
        raise BadInput(f"cache.{stray[0]}{where} is not an option of cache={name}; its options: "
                       f"{', '.join(f'cache.{k}' for k in OPTIONS[name])}")
    if name == "teacache":
        return TeaCache(num_layers, num_steps, variant=variant, group=group, **options)
    return CACHES[name](num_layers, group=group, **options)
