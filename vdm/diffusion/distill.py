"""Progressive distillation (Salimans & Ho, 2022) on the DDIM grid: the two-teacher-step target and its loss.

A student of n steps takes one DDIM step a_j -> a_{j+1} of its n-step grid where the teacher takes two steps of
its 2n-step grid, a_j -> b -> a_{j+1} with b = b_{2j+1} (model timesteps t_{2j} = τ_j, then t_{2j+1}). DDIM from
a to a' with the denoised estimate D is (SPEC §4)

    x' = r·x + (a' − a·r)·D,    r = sqrt((1 − a'²)/(1 − a²)).

Two teacher steps, D1 at (x, a) and D2 at (x_b, b), give x'' = r2·r1·x + r2·(b − a·r1)·D1 + (a' − b·r2)·D2 with
r1·r2 = r. The denoised estimate x̃ that makes the student's one step land on x'' solves x'' = r·x + (a' − a·r)·x̃:

    x̃ = (x'' − r·x)/(a' − a·r) = λ·D1 + (1 − λ)·D2,    λ = r2·(b − a·r1)/(a' − a·r),

a weighted mean of the teacher's two estimates (computed so, without the cancellation in x'' − r·x). The
denominator is at least a' − a > 0 on every step: the first, from pure noise (a = 0, zero terminal SNR: r =
sqrt(1 − a'²)), and the last, to the data (a' = 1: r = r2 = 0, so λ = 0 and x̃ = D2 = x''). The loss compares the
student's denoised estimate with x̃, so it holds for any parametrisation: with the v-weighting 1/(1 − a²) it is
the v-MSE against ṽ = (a·x_t − x̃)/sqrt(1 − a²).

The teacher is called with its own guidance (CFG in the first round), so the target is the guided result and
the student needs one conditional pass per step.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .samplers import GridSampler, ddim_ratio, ddim_step, per_row
from .weighting import VWeighting


def two_step_weight(a: torch.Tensor, b: torch.Tensor, a_next: torch.Tensor) -> torch.Tensor:
    """λ (B,) float64 with x̃ = λ·D1 + (1 − λ)·D2 for the teacher's steps a -> b -> a_next."""
    a, b, a_next = a.double(), b.double(), a_next.double()
    r1, r2 = ddim_ratio(a, b), ddim_ratio(b, a_next)
    return r2 * (b - a * r1) / (a_next - a * r1 * r2)


def two_step_target(D1: torch.Tensor, D2: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    a_next: torch.Tensor) -> torch.Tensor:
    """x̃: the denoised estimate whose one DDIM step a -> a_next lands where the steps a -> b (D1), b -> a_next (D2) do."""
    lam = two_step_weight(a, b, a_next)
    return per_row(lam, D1) * D1 + per_row(1 - lam, D2) * D2


class ProgressiveDistillationLoss:
    """Per sample w(a)·‖D_student(x_t) − x̃‖² at a student step j ~ U{0..n−1}, with x_t = a_j·x0 + sqrt(1 − a_j²)·ε.

    Args:
        teacher: the frozen teacher network (called like the student's: `teacher(x, timesteps, cond)`).
        guider: the teacher's guidance (CFG for the first round's teacher; `IdentityGuider` after).
        sampler: the DDIM sampler whose grids the student (n steps) and the teacher (2n steps) sample on.
        student_steps: n.
        weighting, min_snr_value: the training loss's weighting w(a) and its clamp.
        uc_keys: batch keys whose unconditional embedding is all zeros (`engine.unconditional_keys()`).

    Called like `VideoDiffusionLoss` (`loss(network, denoiser, conditioner, x0, batch) -> (B,)`), so the engine's
    forward, and with it data parallelism, is unchanged. The student always sees its full condition (it samples
    without guidance); timesteps and noise come from the global random streams, which checkpoints hold.
    """

    def __init__(self, teacher: nn.Module, guider, sampler: GridSampler, student_steps: int, weighting=None,
                 min_snr_value: float | None = None, uc_keys=()):
        self.teacher = teacher
        self.guider = guider
        self.student_steps = student_steps
        self.teacher_steps = 2 * student_steps
        self.tau, self.a = sampler.sampling_grid(student_steps)  # (n,) descending, (n+1,) float64 from 0 to 1
        self.t, self.b = sampler.sampling_grid(self.teacher_steps)
        self.weighting = weighting if weighting is not None else VWeighting()
        self.min_snr_value = min_snr_value
        self.uc_keys = list(uc_keys)

    @torch.no_grad()
    def teacher_denoise(self, denoiser, x: torch.Tensor, a: torch.Tensor, step_idx: torch.Tensor, cond: dict,
                        uc: dict) -> torch.Tensor:
        """The teacher's guided estimate at its steps `step_idx` (B,) of the 2n-step grid, from noise levels a (B,)."""
        timesteps = self.t[step_idx].to(x.device)
        x_in, a_in, cond_in = self.guider.prepare_inputs(x, a.to(device=x.device, dtype=x.dtype), cond, uc)
        D = denoiser(self.teacher, x_in, a_in, cond_in, timesteps=timesteps.repeat(self.guider.num_branches))
        if self.guider.num_branches == 1:
            return D
        D_u, D_c = D.chunk(2)
        out = torch.empty_like(x)
        for i in step_idx.unique().tolist():  # the guider's scale may depend on the step (dynamic CFG)
            rows = (step_idx == i).to(x.device)
            out[rows] = self.guider(torch.cat([D_u[rows], D_c[rows]]), timestep=int(self.t[i]), step_idx=i,
                                    num_steps=self.teacher_steps)
        return out

    @torch.no_grad()
    def target(self, denoiser, x_t: torch.Tensor, j: torch.Tensor, cond: dict, uc: dict
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x'', x̃) for samples x_t at the student's steps j (B,): where two teacher steps land, and the
        denoised estimate that lands there in one student step."""
        a, b, a_next = self.a[j], self.b[2 * j + 1], self.a[j + 1]
        D1 = self.teacher_denoise(denoiser, x_t, a, 2 * j, cond, uc)
        x_b = ddim_step(x_t, D1, a, b)
        D2 = self.teacher_denoise(denoiser, x_b, b, 2 * j + 1, cond, uc)
        return ddim_step(x_b, D2, b, a_next), two_step_target(D1, D2, a, b, a_next)

    def __call__(self, network, denoiser, conditioner, x0, batch) -> torch.Tensor:
        cond, uc = conditioner.get_unconditional_conditioning(batch, force_uc_zero_embeddings=self.uc_keys)
        x0 = x0.float()
        B = x0.shape[0]
        j = torch.randint(0, self.student_steps, (B,), device=x0.device).cpu()
        a = self.a[j]
        eps = torch.randn_like(x0)
        x_t = per_row(a, x0) * x0 + per_row((1 - a**2).sqrt(), x0) * eps
        _, x0_target = self.target(denoiser, x_t, j, cond, uc)
        a_in = a.to(device=x0.device, dtype=x0.dtype)
        x0_hat = denoiser(network, x_t, a_in, cond, timesteps=self.tau[j].to(x0.device))
        w = self.weighting(a_in)
        if self.min_snr_value is not None:
            w = torch.clamp(w, max=self.min_snr_value)
        return w * ((x0_hat - x0_target) ** 2).flatten(1).mean(dim=1)
