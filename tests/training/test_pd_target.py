"""The progressive-distillation target: one student DDIM step with it lands exactly where two guided teacher
DDIM steps land, at every step of the grid (the first from pure noise, the last to the data)."""

from dataclasses import replace
from functools import partial

import pytest
import torch

from tests.conftest import TINY_NETWORK
from vdm.build import build_engine, compose
from vdm.diffusion import IdentityGuider, VanillaCFG, VideoDDIMSampler
from vdm.diffusion.discretization import ZeroSNRDDPM
from vdm.diffusion.distill import ProgressiveDistillationLoss
from vdm.diffusion.samplers import ddim_step
from vdm.networks.lora import add_lora
from vdm.training.distill import frozen_copy


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    engine = build_engine(compose(TINY_NETWORK + ["denoiser=video_v", "discretization=zero_snr"])).eval()
    with torch.no_grad():  # a teacher whose estimates vary strongly with x, t and the prompt (no zero-init layers)
        for p in engine.network.parameters():
            p.normal_(0, 0.1)
    return engine


def conditions(engine, prompts):
    return engine.conditioning({"txt": prompts})


def teacher_loss(engine, sampler, student_steps, guider):
    return ProgressiveDistillationLoss(engine.model, guider, sampler, student_steps,
                                       uc_keys=engine.unconditional_keys())


@pytest.mark.parametrize("student_steps", [1, 4])
def test_one_student_step_with_the_target_lands_where_two_teacher_steps_land(engine, student_steps):
    loss = teacher_loss(engine, engine.sampler_ddim, student_steps, VanillaCFG(2.0))
    cond, uc = conditions(engine, ["a red square moving right"] * student_steps)
    j = torch.arange(student_steps)  # every step of the student's grid, first (a = 0) and last (a' = 1) included
    a, a_next = loss.a[j], loss.a[j + 1]
    assert a[0] == 0 and a_next[-1] == 1
    x0 = torch.randn(student_steps, 9, 48, 8, 8)
    x_t = a.float().view(-1, 1, 1, 1, 1) * x0 + (1 - a.float() ** 2).sqrt().view(-1, 1, 1, 1, 1) * torch.randn_like(x0)
    with torch.no_grad():
        x_two, x0_target = loss.target(engine.denoiser, x_t, j, cond, uc)
    torch.testing.assert_close(ddim_step(x_t, x0_target, a, a_next), x_two, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x0_target[-1], x_two[-1])  # the last step lands on the target itself


def test_an_exact_student_samples_like_the_teacher_at_twice_its_steps(engine):
    """Through the samplers themselves: a 'student' that returns the target at each of its 4 DDIM steps gives the
    same video as the guided teacher's 8 DDIM steps (grids rescaled over the full table, so the 4-step grid is
    every other point of the 8-step one)."""
    discretization = ZeroSNRDDPM(rescale="full")
    teacher_sampler = VideoDDIMSampler(discretization, VanillaCFG(2.0), num_steps=8)
    loss = teacher_loss(engine, teacher_sampler, 4, teacher_sampler.guider)
    prompts = ["a red square moving right", "a blue circle moving up"]
    cond, uc = conditions(engine, prompts)
    noise = torch.randn(2, 9, 48, 8, 8)
    with torch.no_grad():
        teacher = teacher_sampler(partial(engine.denoiser, engine.model), noise, cond, uc=uc)

        def exact_student(x, a, cond_in, step_idx, timesteps, **kwargs):
            j = torch.full((x.shape[0],), step_idx)
            return loss.target(engine.denoiser, x, j, cond, uc)[1]

        student = replace(teacher_sampler, guider=IdentityGuider(), num_steps=4)(exact_student, noise, cond)
    torch.testing.assert_close(student, teacher, atol=1e-4, rtol=1e-4)


def test_the_teacher_copy_shares_a_lora_base_and_is_frozen(engine):
    network = add_lora(frozen_copy(engine.network).requires_grad_(False), rank=2)
    for name, p in network.named_parameters():
        p.requires_grad_("lora_" in name)
    teacher = frozen_copy(network)
    base = dict(network.named_parameters())
    for name, p in teacher.named_parameters():
        assert not p.requires_grad
        assert (p is base[name]) == ("lora_" not in name), name  # the base is shared, the adapters are copies
