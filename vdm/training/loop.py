"""The training loop. `train(cfg, run_dir)` is all `train.py` calls; its parts live beside it: the base
weights (`base`), data or fully sharded parallelism (`parallel`), the state that checkpoints as one dict
(`state`), one step (`step`), the non-finite guard (`guard`), checkpoints and their policy (`checkpoint`),
TensorBoard media (`media`), the resumable data stream (`data`), the learning-rate schedule (`schedule`) and
progressive distillation's rounds (`distill`, use_pd=true).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm

from vdm import runs
from vdm.build import build_engine, check_trainable, instantiate
from vdm.errors import BadInput
from vdm.reproducible import warn_unless_pinned
from vdm.runs import Progress, latest_checkpoint
from vdm.training.base import resolve_base_weights
from vdm.training.checkpoint import CheckpointPolicy, check_resumable, load_checkpoint, save_checkpoint
from vdm.training.data import batch_stream
from vdm.training.distill import (
    Distiller,
    DistillPlan,
    check_teacher,
    distill_plan,
    record_teacher,
    teacher_guider,
)
from vdm.training.ema import EMA
from vdm.training.guard import NaNGuard
from vdm.training.media import MediaOptions, log_media
from vdm.training.parallel import DataParallel, make_parallel
from vdm.training.schedule import make_scheduler
from vdm.training.state import NetworkWeights, TrainState
from vdm.training.step import train_step
from vdm.training.tensorboard import StepMeter, TensorBoard

log = logging.getLogger(__name__)

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Train per `cfg` inside `run_dir`; returns the final checkpoint folder."""
    check_train_config(cfg)
    warn_unless_pinned(log)
    plan = distill_plan(cfg)  # None unless use_pd
    max_steps = plan.total_steps if plan else cfg.max_steps
    run_dir = Path(run_dir)
    # Accelerate keeps process-wide state; a second train() in one process (notebooks, sweeps in-process,
    # tests) may ask for another precision, so start from a clean AcceleratorState (the process group stays).
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    parallel = make_parallel(accelerator, cfg.fsdp, cfg.mixed_precision, cfg.compile_model)
    resume_from = runs.resolve_resume(cfg.resume, run_dir)
    if resume_from is not None:
        check_resumable(resume_from, parallel)
    check_teacher(cfg, resume_from)
    base_weights, base_source = resolve_base_weights(cfg, run_dir, resume_from)
    if cfg.get("pretrained"):
        check_trainable(cfg.pretrained, cfg)  # before the data: a folder training cannot take is refused first
    dataset = instantiate(cfg.data)  # data errors surface before any model is built
    set_seed(int(cfg.seed) + parallel.rank)  # distinct noise and timesteps per process
    engine = build_engine(cfg, network_weights=base_weights, weights_source=str(base_source))  # or pretrained
    guider = teacher_guider(cfg) if plan else None
    if parallel.is_main:  # only once the config has proven buildable
        if plan:
            base_source = record_teacher(run_dir, base_weights, base_source)
        runs.write_run_config(cfg, run_dir, init_from=base_source)
    model, state = make_train_state(cfg, engine, parallel, plan)
    distiller = Distiller(plan, engine, state, run_dir, guider, base_source) if plan else None
    if resume_from is not None:
        load_checkpoint(resume_from, state, parallel)
        log.info("resumed from %s at step %d", resume_from, state.progress.step)

    progress = state.progress
    stream = iter(batch_stream(dataset, cfg.batch_size, start=progress.data_position, seed=cfg.seed,
                               rank=parallel.rank, world_size=parallel.world_size, num_workers=cfg.num_workers))
    samples_per_step = cfg.batch_size * parallel.world_size * cfg.grad_accum_steps
    policy = CheckpointPolicy(cfg.checkpoint.every, cfg.checkpoint.keep, max_steps,
                              plan.round_ends if plan else frozenset())
    media = MediaOptions(cfg.video_every, cfg.video_samples, cfg.video_num_steps, cfg.video_latent_frames,
                         cfg.video_offload)
    guard, meter = NaNGuard(cfg.nan_tolerance), StepMeter(samples_per_step)
    tb = TensorBoard(run_dir / "tb") if parallel.is_main else None
    bar = tqdm(total=max_steps, initial=progress.step, desc="train", disable=not parallel.is_main,
               dynamic_ncols=True)
    final = None
    model.train()
    try:
        while progress.step < max_steps:
            if distiller is not None:
                distiller.prepare(progress.step)
                media = replace(media, num_steps=distiller.student_steps, sampler=distiller.sampler)
            batches = [to_device(next(stream), parallel.device) for _ in range(cfg.grad_accum_steps)]
            result = train_step(model, engine, state, batches, parallel, cfg.clip_grad_norm or None,
                                distiller.loss_fn if distiller is not None else None)
            progress.step += 1
            progress.data_position += samples_per_step
            guard.count(progress, result.applied)
            meter.add(result.loss, result.grad_norm, result.applied)
            if progress.step % cfg.log_every == 0 or progress.step == max_steps or not result.applied:
                scalars = meter.scalars(state.scheduler.get_last_lr()[0], progress.skipped_steps)
                if tb is not None:
                    tb.scalars(scalars, progress.step)
                bar.set_postfix(loss=f"{scalars.get('train/loss', float('nan')):.4f}",
                                sps=f"{scalars['train/samples_per_sec']:.1f}")
            guard.check(progress)
            if media.due(progress.step, max_steps) and (parallel.is_main or parallel.collective_forward):
                log_media(engine, batches[-1], tb, progress.step, state.ema, media, parallel)
            bar.update(1)
            if policy.due(progress.step):
                final = save_checkpoint(run_dir, state, parallel, policy.keep, policy.always)
    finally:
        bar.close()
        if tb is not None:
            tb.close()
    # no accelerator.end_training(): it destroys the process group, which belongs to the program (a second
    # train() in one torchrun process would hang on it)
    return final if final is not None else latest_checkpoint(run_dir)  # None: resumed a finished run


def check_train_config(cfg: DictConfig) -> None:
    """Values the loop cannot use, refused in one line naming the key before anything is written."""
    for key in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "nan_tolerance"):
        if int(cfg[key]) < 1:
            what = " (consecutive non-finite steps skipped before the run stops)" if key == "nan_tolerance" else ""
            raise BadInput(f"{key}={cfg[key]} must be a positive integer{what}")
    if cfg.checkpoint.every is not None and int(cfg.checkpoint.every) < 1:
        raise BadInput(f"checkpoint.every={cfg.checkpoint.every} must be >= 1 or null (only at the end)")
    if cfg.checkpoint.keep is not None and int(cfg.checkpoint.keep) < 1:
        raise BadInput(f"checkpoint.keep={cfg.checkpoint.keep} must be >= 1 or null (keep all)")
    if cfg.mixed_precision not in ("no", *HALF):
        raise BadInput(f"mixed_precision={cfg.mixed_precision!r}; valid: no, {', '.join(HALF)}")
    if cfg.video_every and (cfg.video_samples < 1 or cfg.video_num_steps < 1):
        raise BadInput(f"video_samples={cfg.video_samples} and video_num_steps={cfg.video_num_steps} must be "
                       "positive when video_every is set")
    if cfg.video_latent_frames is not None and cfg.video_latent_frames < 1:
        raise BadInput(f"video_latent_frames={cfg.video_latent_frames} must be >= 1 or null (the whole clip)")


def make_train_state(cfg: DictConfig, engine: nn.Module, parallel: DataParallel, plan: DistillPlan | None = None
                     ) -> tuple[nn.Module, TrainState]:
    """Freeze what does not train (stored in the half dtype under mixed precision), wrap or shard the
    engine, and build the optimizer, schedule and EMA over the trainable network parameters (distillation:
    at pd.lr, the pd.scheduler restarting every round). Returns the module the training step calls and the
    state."""
    engine.disable_untrainable_params()
    if cfg.mixed_precision != "no":
        store_frozen_in(engine, HALF[cfg.mixed_precision])
    stray = [k for k, p in engine.named_parameters() if p.requires_grad and not k.startswith("model.diffusion_model.")]
    if stray:
        raise BadInput(f"only network parameters can be trained and checkpointed, but {stray[0]!r} is trainable; "
                       "add its prefix to not_trainable_prefixes")
    if not any(p.requires_grad for p in engine.network.parameters()):
        raise BadInput("no trainable network parameters (check not_trainable_prefixes and lora_train)")
    model = parallel.wrap(engine)
    trainable = {k: p for k, p in engine.network.named_parameters() if p.requires_grad}  # shards under FSDP
    lr = {} if plan is None else {"lr": cfg.pd.lr}
    optimizer = parallel.prepare_optimizer(instantiate(cfg.optim, params=list(trainable.values()), **lr))
    schedule = cfg.scheduler if plan is None else cfg.pd.scheduler
    scheduler = make_scheduler(optimizer, schedule.warmup_steps, plan.steps_per_round if plan else cfg.max_steps,
                               schedule.decay, schedule.min_lr_ratio, restart=plan is not None)
    ema = EMA(trainable, cfg.ema.decay) if cfg.ema.enabled else None
    return model, TrainState(NetworkWeights(engine.network, bool(cfg.lora_train)), optimizer, scheduler, ema,
                             Progress(lora=bool(cfg.lora_train)))


def store_frozen_in(engine: nn.Module, dtype: torch.dtype) -> None:
    """Mixed precision: what does not train (a LoRA run's base network, frozen text encoders, the first
    stage) is stored in the half dtype, halving its memory; trainable parameters stay float32 for the
    optimizer, and autocast computes in the half dtype either way."""
    for p in engine.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    for embedder in engine.conditioner.embedders:  # lazily loaded encoders load in their module's dtype
        if not getattr(embedder, "is_trainable", False):
            embedder.to(dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
