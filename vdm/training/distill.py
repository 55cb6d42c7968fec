"""Progressive distillation rounds (`use_pd=true`; Salimans & Ho, 2022; SPEC §7): the plan, its checks, each
round's teacher, and the record every checkpoint of the run carries.

Round k of R (1-based) distils a teacher of T/2^(k−1) DDIM steps into a student of T/2^k steps, T =
pd.teacher_steps, for pd.steps_per_round training steps (`vdm.diffusion.distill` holds the target). The first
teacher is `init_from` (its EMA weights when it has them, as sample.py samples it) guided by this run's `guider`:
the student learns the guided result, so it samples with one conditional pass per step. Guidance as a student
input would need a new embedding in the DiT, breaking CogVideoX weight compatibility and LoRA on a frozen base.
Each later round's teacher is the previous round's final student, read back from its checkpoint (EMA weights
when ema.enabled), which is always written and never pruned; the student starts from it with a fresh optimizer
state, EMA and learning-rate schedule. So a run resumed anywhere finds its teacher again: the first one in the
network as built, the others in the checkpoints.

A LoRA student keeps training the same adapters round after round on the frozen base (the first teacher); its
teachers share that base and copy only the adapters.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from vdm import runs
from vdm.build import CONF_DIR, instantiate
from vdm.diffusion.distill import ProgressiveDistillationLoss
from vdm.diffusion.guiders import IdentityGuider
from vdm.errors import BadInput, NotFound
from vdm.networks.wrapper import NetworkWrapper
from vdm.training.schedule import DECAYS
from vdm.training.state import TrainState

log = logging.getLogger(__name__)

TEACHER = "teacher.safetensors"  # in the run folder: the first teacher's EMA weights, as a plain weights file


@dataclass(frozen=True)
class DistillPlan:
    teacher_steps: int  # the first teacher's DDIM steps
    student_steps: int  # the last student's
    steps_per_round: int

    @property
    def rounds(self) -> int:
        return (self.teacher_steps // self.student_steps).bit_length() - 1

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    @property
    def round_ends(self) -> frozenset[int]:
        return frozenset(self.round_end(r) for r in range(self.rounds))

    def round_of(self, step: int) -> int:
        """The round (0-based) that training step `step` (0-based) belongs to."""
        return min(step // self.steps_per_round, self.rounds - 1)

    def round_end(self, r: int) -> int:
        return (r + 1) * self.steps_per_round

    def student_steps_of(self, r: int) -> int:
        return self.teacher_steps >> (r + 1)


def distill_plan(cfg: DictConfig) -> DistillPlan | None:
    """The rounds of a use_pd run (None otherwise); options that cannot work are refused in one line."""
    pd = cfg.get("pd")
    if not cfg.use_pd:
        if pd is None:  # a config composed without the pd group
            return None
        default = OmegaConf.load(CONF_DIR / "pd" / "default.yaml")
        for key, value in _leaves(OmegaConf.to_container(pd, resolve=True)):
            if OmegaConf.select(default, key, default="<unset>") != value:
                raise BadInput(f"pd.{key}={value} is set but use_pd=false: pd options configure progressive "
                               "distillation; add use_pd=true init_from=<teacher> or drop them")
        return None
    if cfg.fsdp:
        raise BadInput("use_pd=true does not support fsdp=true (the teacher is a whole copy of the network); "
                       "set fsdp=false")
    t, s, per_round = pd.teacher_steps, pd.student_steps, pd.steps_per_round
    num_timesteps = cfg.discretization.get("num_timesteps", 1000)
    if not isinstance(t, int) or not 2 <= t <= num_timesteps:
        raise BadInput(f"pd.teacher_steps={t} must be an integer in 2..{num_timesteps}")
    valid = [t >> k for k in range(1, t.bit_length()) if (t >> k) << k == t]
    if s not in valid:
        raise BadInput(f"pd.student_steps={s} must divide pd.teacher_steps={t} by a power of two; valid: "
                       f"{', '.join(map(str, valid))}")
    if not isinstance(per_round, int) or per_round < 1:
        raise BadInput(f"pd.steps_per_round={per_round} must be a positive integer")
    if not pd.lr > 0:
        raise BadInput(f"pd.lr={pd.lr} must be > 0")
    if pd.scheduler.decay not in DECAYS:
        raise BadInput(f"pd.scheduler.decay={pd.scheduler.decay!r}; valid: {', '.join(DECAYS)}")
    if pd.guidance_scale is not None and "scale" not in cfg.guider:
        raise BadInput(f"pd.guidance_scale={pd.guidance_scale} but the guider ({cfg.guider._target_}) has no "
                       "scale; choose guider=cfg or guider=dynamic_cfg")
    return DistillPlan(t, s, per_round)


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_teacher(cfg: DictConfig, resume_from: Path | None) -> None:
    if cfg.use_pd and resume_from is None and cfg.init_from is None and not cfg.get("pretrained"):
        raise BadInput("use_pd=true needs a teacher: init_from=<teacher run, checkpoint or .safetensors file> "
                       "(or pretrained=<CogVideoX folder>)")


def teacher_guider(cfg: DictConfig):
    """The first teacher's guidance: the run's `guider`, at pd.guidance_scale when set."""
    node = cfg.guider if cfg.pd.guidance_scale is None else OmegaConf.merge(cfg.guider,
                                                                            {"scale": cfg.pd.guidance_scale})
    return instantiate(node)


def record_teacher(run_dir: Path, weights: dict[str, torch.Tensor] | None, source: Path | None) -> Path | None:
    """The weights file the run config records as the first teacher (`init_from`, also a LoRA student's base):
    a checkpoint's EMA weights are copied to `<run>/teacher.safetensors`, a plain weights file is kept."""
    if source is None or source.name != runs.EMA:
        return source
    path = Path(run_dir) / TEACHER
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, path)
    return path


def frozen_copy(network: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of `network` that shares its frozen parameters (a LoRA student's base)."""
    shared = {id(p): p for p in network.parameters() if not p.requires_grad}
    teacher = copy.deepcopy(network, shared)
    return teacher.requires_grad_(False).eval()


def load_into(network: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `weights` (all or some of the network's, e.g. LoRA adapters or an EMA of the trainable ones) in."""
    own = network.state_dict()
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        raise BadInput(f"{source}: weight {unexpected[0]!r} has no place in this run's network")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v)


class DistillRecord:
    """The `distill` part of a checkpoint (distill.json): the student's round, DDIM steps and guidance, which
    sampling reads, and the plan, which a resumed run must share."""

    def __init__(self, plan: DistillPlan, state: TrainState, guider, first_teacher: Path | None):
        self.plan, self.state, self.guider, self.first_teacher = plan, state, guider, first_teacher

    def state_dict(self) -> dict:
        step = self.state.progress.step
        r = self.plan.round_of(max(step - 1, 0))  # the round the last step trained in
        n = self.plan.student_steps_of(r)
        return {"round": r + 1, "rounds": self.plan.rounds, "student_steps": n, "teacher_steps": 2 * n,
                "round_complete": step == self.plan.round_end(r), "sampler": "ddim", "guidance": "distilled",
                "distilled_guider": type(self.guider).__name__,
                "distilled_guidance_scale": getattr(self.guider, "scale", None),
                "first_teacher": None if self.first_teacher is None else str(self.first_teacher),
                "plan": asdict(self.plan)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("plan") != asdict(self.plan):
            given = ", ".join(f"pd.{k}={v}" for k, v in state.get("plan", {}).items())
            raise BadInput(f"the checkpoint was distilled with {given}; resume it with the same pd options")


class Distiller:
    """Keeps the current round: its loss (`loss_fn`: the teacher and step count), the sampler its student's
    videos are drawn with (`sampler`), and at a round's start the student re-started from the teacher. The
    training step is handed both; the engine keeps its own. Create it after the train state and before
    loading a checkpoint (the network as built is the first teacher); call `prepare(step)` before every
    training step."""

    def __init__(self, plan: DistillPlan, engine: nn.Module, state: TrainState, run_dir: Path, guider,
                 first_teacher: Path | None = None):
        self.plan, self.engine, self.state, self.run_dir, self.guider = plan, engine, state, Path(run_dir), guider
        self.weighting = engine.loss_fn.weighting
        self.min_snr_value = engine.loss_fn.min_snr_value
        self.first_teacher: nn.Module | None = frozen_copy(engine.network)
        self.round: int | None = None
        self.loss_fn: ProgressiveDistillationLoss | None = None  # set by prepare for the round
        self.sampler = None
        state.distill = DistillRecord(plan, state, guider, first_teacher)

    @property
    def student_steps(self) -> int:
        return self.plan.student_steps_of(self.round or 0)

    def prepare(self, step: int) -> None:
        r = self.plan.round_of(step)
        if r == self.round:
            return
        if r == 0:
            teacher = self.first_teacher
        else:
            self.first_teacher = None
            source, weights = self.final_student(r - 1)
            teacher = frozen_copy(self.engine.network)
            load_into(teacher, weights, source)
            if step == r * self.plan.steps_per_round:
                self.restart_student(weights)
        n = self.plan.student_steps_of(r)
        engine = self.engine
        self.loss_fn = ProgressiveDistillationLoss(
            NetworkWrapper(teacher), self.guider if r == 0 else IdentityGuider(), engine.sampler_ddim, n,
            self.weighting, self.min_snr_value, engine.unconditional_keys())
        self.sampler = replace(engine.sampler_ddim, guider=IdentityGuider(), num_steps=n)
        self.round = r
        log.info("distillation round %d of %d: %d -> %d DDIM steps", r + 1, self.plan.rounds, 2 * n, n)

    def final_student(self, r: int) -> tuple[Path, dict[str, torch.Tensor]]:
        """Round r's last student as sampled: its checkpoint's EMA weights (or raw weights without EMA)."""
        checkpoint = runs.checkpoints_dir(self.run_dir) / f"step-{self.plan.round_end(r)}"
        source = checkpoint / (runs.EMA if self.state.ema is not None else runs.MODEL)
        if not source.is_file():
            raise NotFound(f"{source}: round {r + 1}'s final student, the next round's teacher, is missing")
        return source, {k: v for k, v in runs.load_weights(source).items() if not k.startswith("__")}

    def restart_student(self, weights: dict[str, torch.Tensor]) -> None:
        """The student starts the round as its teacher, with a fresh optimizer state and EMA."""
        with torch.no_grad():
            for name, p in self.engine.network.named_parameters():
                if p.requires_grad:
                    p.copy_(weights[name])
        self.state.optimizer.state.clear()
        if self.state.ema is not None:
            self.state.ema.reset()
