"""Multi-prompt long videos (DiTCtrl, SPEC §5): segment layout, blending, the long latent's denoiser and
the multi-prompt sampler config.

Prompts P_1..P_K become S segments of `tile_size` latent frames on one long latent, consecutive
segments overlapping by `overlap_size` frames. Every step, each adjacent pair (k, k+1) is denoised
together so that the attention control can let segment k+1 attend to segment k's keys and values;
the pair outputs are blended into the long latent with triangular weights (`MultiPromptDenoiser`: long
latent in, blended estimate out), and one sampler update (DPM-Solver++(2M) SDE in the reference) runs on
the whole latent.

Two schedules give the same latents:
- `reuse=False` is the reference: every pair, every step — 2·(S−1) segment passes.
- `reuse=True` (default) computes each piece of shared work once. Outside the control's active
  steps both copies of a segment are the same computation, so each segment is evaluated once and
  weighted by the number of pairs it belongs to. Inside them, every layer below the first active
  layer is shared too: the network runs the S segments up to that layer and only then splits each
  into its source and target copies (`expand`).

Across processes (`processes`), each step's units of work (the pairs, or outside the window with
`reuse=True` the segments) are cut into contiguous blocks, one per process. A process evaluates its
block as a smaller job of the same kind (pairs p..q on segments p..q+1), and all_gather brings every
unit's D to every process, which blends them in the single-process order and takes the same DPM++ step
with the same noise. The split is exact because nothing crosses a pair: a target reads only its own
pair's source K/V, and mask-guided's map sums are per row (reindexed by `expand`), so a block's rows
see what they would in the full batch; the latents equal the single-process ones up to the float
rounding of a batch of another size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from vdm.diffusion.guiders import Guider
from vdm.diffusion.samplers import GuidedDenoiser, Step, VPSDEDPMPP2MSampler
from vdm.distributed import Processes
from vdm.errors import BadInput
from vdm.networks.attention_control import AttentionControl, CallContext, Expand
from vdm.networks.kv_sharing import MaskGuidedKVSharing
from vdm.networks.visualize import VisualizeAttention


@dataclass(frozen=True)
class SegmentCondition:
    """A segment's condition: prompt `a`, or for transitions the mix (1−λ)·c_a + λ·c_b with the
    unconditional embedding of the closer prompt."""

    a: int
    b: int
    mix: float = 0.0

    @property
    def uc_prompt(self) -> int:
        return self.b if self.mix > 0.5 else self.a


def plan_segments(num_prompts: int, num_transition_blocks: int = 0,
                  longer_mid_segment: int = 0) -> list[SegmentCondition]:
    """Segments in order: 1 per end prompt, 1 + q per middle prompt (all 1 when K ≤ 2), and m
    transition segments between consecutive prompts with mix j/(m+1), j = 1..m."""
    if num_prompts < 1:
        raise BadInput("multi-prompt sampling needs at least one prompt")
    if num_transition_blocks < 0 or longer_mid_segment < 0:
        raise BadInput(f"num_transition_blocks={num_transition_blocks} and longer_mid_segment={longer_mid_segment} "
                       "must be >= 0")
    if num_prompts == 1 and (num_transition_blocks or longer_mid_segment):
        raise BadInput("num_transition_blocks and longer_mid_segment need at least two prompts; "
                       "a single prompt takes neither (set them to 0)")
    plan: list[SegmentCondition] = []
    for i in range(num_prompts):
        middle = 0 < i < num_prompts - 1
        plan += [SegmentCondition(i, i)] * (1 + (longer_mid_segment if middle else 0))
        if i < num_prompts - 1:
            m = num_transition_blocks
            plan += [SegmentCondition(i, i + 1, j / (m + 1)) for j in range(1, m + 1)]
    return plan


def num_segments(num_prompts: int, num_transition_blocks: int = 0, longer_mid_segment: int = 0) -> int:
    """S = K + m·(K−1) + q·(K−2) for K > 2 (q does not apply when K ≤ 2)."""
    K, m, q = num_prompts, num_transition_blocks, longer_mid_segment
    return K + m * (K - 1) + (q * (K - 2) if K > 2 else 0)


def long_latent_frames(num_segments: int, tile_size: int, overlap_size: int) -> int:
    """T_long = L + (S−1)·(L−O)."""
    check_tiles(tile_size, overlap_size)
    return tile_size + (num_segments - 1) * (tile_size - overlap_size)


def check_tiles(tile_size: int, overlap_size: int, max_frames: int | None = None) -> None:
    if tile_size < 1:
        raise BadInput(f"tile_size={tile_size} must be >= 1")
    if not 0 <= overlap_size < tile_size:
        raise BadInput(f"overlap_size={overlap_size} must be in 0..{tile_size - 1} (below tile_size={tile_size})")
    if max_frames is not None and tile_size > max_frames:
        raise BadInput(f"tile_size={tile_size} exceeds the network's {max_frames} latent frames")


def blend_weights(tile_size: int, dtype=torch.float64) -> torch.Tensor:
    """Triangular per-frame weights w_j = min((j+0.5)·2/L, 2 − (j+0.5)·2/L), j = 0..L−1."""
    j = torch.arange(tile_size, dtype=dtype) + 0.5
    return torch.minimum(j * 2 / tile_size, 2 - j * 2 / tile_size)


def segment_starts(num_segments: int, tile_size: int, overlap_size: int) -> list[int]:
    return [k * (tile_size - overlap_size) for k in range(num_segments)]


def mix_conditions(conds: list[dict], plan: list[SegmentCondition]) -> list[dict]:
    """Per-segment condition dicts: tensors mixed linearly for transition segments."""
    out = []
    for seg in plan:
        ca, cb = conds[seg.a], conds[seg.b]
        out.append({k: (1 - seg.mix) * ca[k] + seg.mix * cb[k] for k in ca})
    return out


def writes_files(control: AttentionControl) -> bool:
    """Whether the control saves images (attention maps, masks) into folders named per forward pass."""
    return isinstance(control, VisualizeAttention) or (
        isinstance(control, MaskGuidedKVSharing) and control.save_masks_dir is not None)


def _cat(dicts: list[dict]) -> dict:
    return {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}


@dataclass
class MultiPromptDenoiser:
    """`(x_long, step) -> D_long`: the blended, guided estimate of a long latent `(1, T_long, C, H, W)` of
    overlapping segments, for any sampler function to drive (`MultiPromptDPMPP2MSampler` drives it with
    DPM++(2M) SDE, as the reference does).

    `conds` / `ucs`: per segment (`mix_conditions`); `ctx.control` tells the schedule where work can be
    shared, and each evaluation hands the network that control with its own sharing layout (built once
    per segment count and split layer, in `layouts`). `stats`, when a dict, receives `layer_evaluations`:
    segment passes through one layer, summed over the run (CFG counted once), of this process.
    `processes` share each step's segment passes; every one of them calls it with the same x. `cache` (a maker of
    fresh `vdm.networks.caches.StepCache`s): each segment pass (a pair, or with reuse=true and no control a
    segment, then evaluated alone) keeps a step cache of its own across the steps, in `caches`, which decides for
    that pass alone, whichever process runs it."""

    model_denoise: Callable
    guider: Guider
    conds: list[dict]
    ucs: list[dict]
    tile_size: int
    overlap_size: int
    num_layers: int
    ctx: CallContext = field(default_factory=CallContext)
    reuse: bool = True
    processes: Processes = Processes()
    stats: dict | None = None
    layouts: dict = field(default_factory=dict, repr=False)  # (segments, split layer) -> CallContext
    cache: Callable | None = None
    caches: dict = field(default_factory=dict, repr=False)  # a segment pass -> its step cache

    def __call__(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """One step's blended, guided D on the long latent. The step's segment passes are units of work
        (pairs, or single segments) shared among `processes` in contiguous blocks; every process gathers all
        of their D and blends them in the same order."""
        S, L = len(self.conds), self.tile_size
        starts = segment_starts(S, L, self.overlap_size)
        segs = [x[:, s:s + L] for s in starts]  # (1, L, C, H, W) each
        control = self.ctx.control
        first = next((i for i in range(self.num_layers) if control.active(step.idx, i, self.num_layers)), None)
        conds, ucs = self.conds, self.ucs
        if not self.reuse:  # the reference: each adjacent pair in its own batch, every step
            def run(block: range) -> list[torch.Tensor]:
                return [self._evaluate(step, segs[p:p + 2], conds[p:p + 2], ucs[p:p + 2], split=0, key=p)
                        for p in block]
            units, per_unit = S - 1, 2
        elif first is None:  # both copies of a segment are one computation: evaluate each once, count it twice
            def run(block: range) -> list[torch.Tensor]:
                if self.cache is not None:  # a cache decides per segment: each its own pass, on any process count
                    return [self._evaluate(step, segs[i:i + 1], conds[i:i + 1], ucs[i:i + 1], split=None, key=i)
                            for i in block]
                k = slice(block.start, block.stop)
                return [self._evaluate(step, segs[k], conds[k], ucs[k], split=None)] if block else []
            units, per_unit = S, 1
        else:  # layers below `first` are shared; above it, each pair's source and target copies
            def run(block: range) -> list[torch.Tensor]:
                k = slice(block.start, block.stop + 1)  # pairs p..q need segments p..q+1
                return [self._evaluate(step, segs[k], conds[k], ucs[k], split=first)] if block else []
            units, per_unit = S - 1, 2
        D = self._shared(run, units, per_unit, control, x)

        acc, norm = torch.zeros_like(x), torch.zeros_like(x[:1, :, :1, :1, :1])
        w = blend_weights(L).to(x).view(1, L, 1, 1, 1)
        for row in range(D.shape[0]):  # pair modes: (source, target) rows per pair; else a row per segment
            k, count = (row // 2 + row % 2, 1.0) if per_unit == 2 else (row, 1.0 if row in (0, S - 1) else 2.0)
            acc[:, starts[k]:starts[k] + L] += count * w * D[row:row + 1]
            norm[:, starts[k]:starts[k] + L] += count * w
        return acc / norm

    def _shared(self, run, units: int, per_unit: int, control, x: torch.Tensor) -> torch.Tensor:
        """All `units` units' D rows (`per_unit` each) in order, this process computing its block of them.
        A control that saves images names its folders by forward pass, so one process runs all of its
        passes (the others wait) and the files are those of a single process."""
        processes = self.processes
        blocks = processes.blocks(units)
        if writes_files(control):
            blocks = [range(units)] + [range(0)] * (processes.world_size - 1)
        rows = run(blocks[processes.rank])
        local = torch.cat(rows).to(x.dtype) if rows else x.new_zeros((0, self.tile_size, *x.shape[2:]))
        return processes.gather(local, [len(b) * per_unit for b in blocks])

    def _sharing(self, n: int, split: int, device: torch.device) -> CallContext:
        """The call context for `n` segments expanded at layer `split` into (source, target) copies of every
        adjacent pair, in every guidance branch (the guider places the rows and pairs)."""
        key = (n, split)
        if key not in self.layouts:
            rows = self.guider.expand_rows([r for p in range(n - 1) for r in (p, p + 1)], n)
            pairs = self.guider.share_pairs([(2 * p, 2 * p + 1) for p in range(n - 1)], 2 * (n - 1))
            expand = Expand(split, torch.tensor(rows, device=device))
            self.layouts[key] = replace(self.ctx, pairs=pairs, expand=expand)
        return self.layouts[key]

    def _evaluate(self, step: Step, segs, conds, ucs, split: int | None, key=None) -> torch.Tensor:
        """Guided D for segments `segs`. Without `split`: one row per segment. With `split` (a layer):
        the rows are expanded there into (source, target) copies of every adjacent pair, and the
        result holds, per pair, D of the source then of the target."""
        x = torch.cat(segs)
        ctx, rows_per_layer = self.ctx, [len(segs) * self.guider.num_branches] * self.num_layers
        if split is not None:
            ctx = self._sharing(len(segs), split, x.device)
            rows_per_layer = rows_per_layer[:split] + [len(ctx.expand.rows)] * (self.num_layers - split)
        if self.cache is not None:  # this pass's own step cache
            if key not in self.caches:
                self.caches[key] = self.cache()
            ctx = replace(ctx, cache=self.caches[key])
        if self.stats is not None:
            self.stats["layer_evaluations"] = (self.stats.get("layer_evaluations", 0)
                                               + sum(rows_per_layer) // self.guider.num_branches)
        return GuidedDenoiser(self.model_denoise, self.guider, _cat(conds), _cat(ucs), {"ctx": ctx})(x, step)


@dataclass(frozen=True)
class MultiPromptDPMPP2MSampler(VPSDEDPMPP2MSampler):
    """The multi-prompt sampler config: DPM-Solver++(2M) SDE driving a `MultiPromptDenoiser` (the reference
    draws the noise twice on second-order steps and uses the second draw: `double_draw=True` by default).

    `__call__(model_denoise, x_long, conds, ucs, num_steps=None, generator=None, *, num_layers, ctx=None,
    stats=None)`: `conds`/`ucs` are per-prompt condition dicts (batch 1), `x_long` is `(1, T_long, C, H, W)`
    noise, `num_layers` the network's depth, `ctx` the call context of the control (plain when None).
    `denoiser(...)` builds the same denoiser for any other sampler function.

    `processes`: the processes that share each step's segment passes; every one of them calls the
    sampler with the same arguments and gets the same latent.
    """

    double_draw: bool = True
    tile_size: int | None = None  # None: the engine fills in the network's frame count
    overlap_size: int = 9
    num_transition_blocks: int = 0
    longer_mid_segment: int = 0
    reuse: bool = True
    processes: Processes = Processes()

    def __post_init__(self):
        super().__post_init__()
        if self.tile_size is not None:
            check_tiles(self.tile_size, self.overlap_size)

    def layout(self, num_prompts: int) -> tuple[list[SegmentCondition], int]:
        """(segment plan, T_long) for `num_prompts` prompts."""
        plan = plan_segments(num_prompts, self.num_transition_blocks, self.longer_mid_segment)
        return plan, long_latent_frames(len(plan), self.tile_size, self.overlap_size)

    def denoiser(self, model_denoise, x: torch.Tensor, conds: list[dict], ucs: list[dict] | None = None, *,
                 num_layers: int, ctx: CallContext | None = None, stats: dict | None = None,
                 num_steps: int | None = None, first_segment: dict | None = None,
                 cache: Callable | None = None) -> MultiPromptDenoiser:
        """The long latent's denoiser for the prompts' conditions, checked against x and the control.
        `first_segment`: entries that replace the first segment's (in cond and uc; image-to-video: the image
        latent, where the other segments take the zero latent)."""
        ucs = conds if ucs is None else ucs
        if self.tile_size is None:
            raise BadInput("tile_size is unset; give it here or sample through the engine, which uses the "
                           "network's frame count")
        plan, frames = self.layout(len(conds))
        if x.shape[0] != 1 or x.shape[1] != frames:
            raise BadInput(f"the long latent must be (1, {frames}, C, H, W) for {len(conds)} prompts "
                           f"({len(plan)} segments); got {tuple(x.shape)}")
        ctx = ctx or CallContext()
        steps = num_steps or self.num_steps
        ctx.control.validate(num_layers, steps)
        if cache is not None and self.reuse and any(ctx.control.active(s, i, num_layers) for s in range(steps)
                                                    for i in range(num_layers)):
            raise BadInput(f"a step cache on a multi-prompt video under {ctx.control.name} needs reuse=false: with "
                           "reuse=true its passes change between segments and pairs at the window's edges")
        seg_conds, seg_ucs = mix_conditions(conds, plan), [ucs[seg.uc_prompt] for seg in plan]
        if first_segment:
            seg_conds[0], seg_ucs[0] = {**seg_conds[0], **first_segment}, {**seg_ucs[0], **first_segment}
        return MultiPromptDenoiser(model_denoise, self.guider, seg_conds, seg_ucs, self.tile_size, self.overlap_size,
                                   num_layers, ctx, self.reuse, self.processes, stats, cache=cache)

    def __call__(self, model_denoise, x, cond, uc=None, num_steps=None, generator=None, *, num_layers: int,
                 ctx: CallContext | None = None, stats: dict | None = None, first_segment: dict | None = None,
                 cache: Callable | None = None):
        """`cache`: a maker of fresh step caches, one per segment pass; `stats["cache"]` then receives what they
        computed, summed over the passes of every process."""
        denoise = self.denoiser(model_denoise, x, cond, uc, num_layers=num_layers, ctx=ctx, stats=stats,
                                num_steps=num_steps, first_segment=first_segment, cache=cache)
        x = self.run(denoise, x, self.grid(num_steps), generator)
        if cache is not None and stats is not None:
            counts = [c.counts() for c in denoise.caches.values()]
            keys = list(cache().counts())
            totals = self.processes.sum(torch.tensor([[len(counts)] + [sum(c[k] for c in counts) for k in keys]],
                                                     dtype=torch.float64, device=x.device))[0]
            stats["cache"] = {"passes": int(totals[0]), **{k: int(v) for k, v in zip(keys, totals[1:])}}
        return x
