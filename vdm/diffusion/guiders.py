"""Guidance: how the denoiser's batch is built (``prepare_inputs``) and how its outputs are combined.

The guider owns the batch's row layout: ``num_branches`` blocks of the caller's rows, CFG's ordered
``[uc..., c...]``. Whoever lays out rows of its own inside a block (an edit pair, the multi-prompt
segments) asks the guider where they land (``expand_rows``, ``share_pairs``). The combination is
x_u + g·(x_c − x_u) (SPEC §4).
"""

import math
from collections.abc import Sequence

import torch

from vdm.errors import BadInput
from vdm.networks.attention_control import SharePair


class Guider:
    """The base of every guider: `num_branches` blocks of rows per evaluation; here one, `[c]`, unguided."""

    num_branches = 1  # batch blocks per evaluation: [c]

    def prepare_inputs(self, x, alpha_cumprod_sqrt, cond, uc):
        return x, alpha_cumprod_sqrt, cond

    def expand_rows(self, rows: Sequence[int], n: int) -> list[int]:
        """Rows of one block of `n` (e.g. a row expansion's) as rows of the guided batch: every block in turn."""
        return [b * n + r for b in range(self.num_branches) for r in rows]

    def share_pairs(self, pairs: Sequence[tuple[int, int]], rows_per_block: int) -> tuple[SharePair, ...]:
        """KV-sharing pairs (source, target) of one block of `rows_per_block` rows, in every block of the guided
        batch; the masks of mask-guided sharing come from the conditional (last) block's rows."""
        cond = (self.num_branches - 1) * rows_per_block
        return tuple(SharePair(b * rows_per_block + s, b * rows_per_block + t, cond + s, cond + t)
                     for b in range(self.num_branches) for s, t in pairs)

    def __call__(self, x0_hat, timestep: int, step_idx: int, num_steps: int | None = None):
        return x0_hat


class IdentityGuider(Guider):
    """No guidance: one conditional pass."""


class VanillaCFG(Guider):
    num_branches = 2  # batch blocks per evaluation: [uc, c]

    def __init__(self, scale: float):
        self.scale = scale

    def prepare_inputs(self, x, alpha_cumprod_sqrt, cond, uc):
        cond_in = {}
        for k, c in cond.items():
            if isinstance(c, torch.Tensor):
                cond_in[k] = torch.cat([uc[k], c])
            elif c == uc.get(k):
                cond_in[k] = c
            else:
                raise BadInput(
                    f"cond[{k!r}] is not a tensor and differs from uc[{k!r}]; it cannot be batched"
                )
        return torch.cat([x, x]), torch.cat([alpha_cumprod_sqrt, alpha_cumprod_sqrt]), cond_in

    def guidance_scale(self, timestep: int, step_idx: int, num_steps: int | None) -> float:
        return self.scale

    def __call__(self, x0_hat, timestep: int, step_idx: int, num_steps: int | None = None):
        x_u, x_c = x0_hat.chunk(2)
        return x_u + self.guidance_scale(timestep, step_idx, num_steps) * (x_c - x_u)


class DynamicCFG(VanillaCFG):
    """CogVideoX's cosine ramp g = 1 + scale·(1 − cos(π·(u/n)^exp))/2.

    As in CogVideoX SAT and diffusers, u = n − timestep with the DDPM timestep 0..999, so u is mostly
    negative and g oscillates; ``use_step_index=True`` uses u = step_idx + 1 instead, so g rises from
    ~1 at the first step to 1 + scale at the last. ``num_steps`` is a default for ``__call__``'s.
    """

    def __init__(self, scale: float, exp: float = 5.0, num_steps: int = 50, use_step_index: bool = False):
        super().__init__(scale)
        if not use_step_index and not float(exp).is_integer():
            raise BadInput(
                f"exp must be an integer when use_step_index=False (u < 0 would give a complex g), got {exp}"
            )
        self.exp = exp
        self.num_steps = num_steps
        self.use_step_index = use_step_index

    def guidance_scale(self, timestep: int, step_idx: int, num_steps: int | None) -> float:
        n = num_steps if num_steps is not None else self.num_steps
        u = step_idx + 1 if self.use_step_index else n - timestep
        return 1 + self.scale * (1 - math.cos(math.pi * (u / n) ** self.exp)) / 2


class EditPairGuidance(Guider):
    """The guidance of an edit pair `[source, target]` whose source row reconstructs an inverted video: the
    target rows combined by `guider`, the source rows at `source_scale` (1: the conditional estimate alone, as
    an unguided inversion computed it; guidance would push the reconstruction away from the video)."""

    def __init__(self, guider: Guider, source_scale: float = 1.0):
        if guider.num_branches == 1 and source_scale != 1.0:
            raise BadInput(f"inversion.source_cfg={source_scale} guides the source row, but the job is unguided; "
                           "give cfg=<scale> (or leave inversion.source_cfg null)")
        self.guider, self.source_scale = guider, source_scale
        self.num_branches = guider.num_branches

    @property
    def scale(self) -> float | None:
        return getattr(self.guider, "scale", None)

    def prepare_inputs(self, x, alpha_cumprod_sqrt, cond, uc):
        return self.guider.prepare_inputs(x, alpha_cumprod_sqrt, cond, uc)

    def __call__(self, x0_hat, timestep: int, step_idx: int, num_steps: int | None = None):
        out = self.guider(x0_hat, timestep, step_idx, num_steps)
        if self.num_branches == 1:
            return out
        x_u, x_c = x0_hat.chunk(2)  # rows [source, target] in each
        source = x_u[:1] + self.source_scale * (x_c[:1] - x_u[:1])
        return torch.cat([source, out[1:]])
