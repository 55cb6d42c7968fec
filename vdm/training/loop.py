"""The training loop: Accelerate data parallelism, AdamW, warm-up/decay, accumulation, clipping, EMA,
TensorBoard, atomic checkpoints and exact resume. `train(cfg, run_dir)` is all `train.py` calls."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm

from vdm import runs
from vdm.build import build_engine, instantiate
from vdm.networks.lora import lora_state_dict
from vdm.runs import EMA as EMA_FILE
from vdm.runs import TrainState, latest_checkpoint, load_weights
from vdm.training.checkpoint import load_training_state, save_checkpoint
from vdm.training.data import batch_stream
from vdm.training.ema import EMA
from vdm.training.schedule import make_scheduler
from vdm.training.tensorboard import TensorBoard

log = logging.getLogger(__name__)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_train_config(cfg: DictConfig) -> None:
    for key in ("max_steps", "batch_size", "grad_accum_steps", "log_every"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key}={cfg[key]} must be a positive integer")
    if cfg.checkpoint.every is not None and int(cfg.checkpoint.every) < 1:
        raise ValueError(f"checkpoint.every={cfg.checkpoint.every} must be >= 1 or null (only at the end)")
    if cfg.checkpoint.keep is not None and int(cfg.checkpoint.keep) < 1:
        raise ValueError(f"checkpoint.keep={cfg.checkpoint.keep} must be >= 1 or null (keep all)")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision={cfg.mixed_precision!r}; valid: no, bf16, fp16")


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def store_frozen_in(engine, dtype: torch.dtype) -> None:
    """Mixed precision: what does not train (a LoRA run's base network, frozen text encoders, the first
    stage) is stored in the half dtype, halving its memory; trainable parameters stay float32 for the
    optimizer, and autocast computes in the half dtype either way."""
    for p in engine.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    for embedder in engine.conditioner.embedders:  # lazily loaded encoders load in their module's dtype
        if not getattr(embedder, "is_trainable", False):
            embedder.to(dtype)


@contextlib.contextmanager
def ema_weights(ema: EMA | None):
    """Temporarily load the EMA weights into the parameters (for logging samples)."""
    if ema is None:
        yield
        return
    backup = {k: p.detach().clone() for k, p in ema.params.items()}
    with torch.no_grad():
        for k, p in ema.params.items():
            p.copy_(ema.shadow[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in ema.params.items():
                p.copy_(backup[k])


def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Train per `cfg` inside `run_dir`; returns the final checkpoint folder."""
    check_train_config(cfg)
    run_dir = Path(run_dir)
    # Accelerate keeps process-wide state; a second train() in one process (notebooks, sweeps in-process,
    # tests) may ask for another precision, so start from a clean AcceleratorState (the process group stays).
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process

    resume_from = runs.resolve_resume(cfg.resume, run_dir)
    base_weights, base_source = None, None
    if cfg.lora_train and not cfg.get("pretrained"):  # with pretrained, build_engine loads the folder's base
        if resume_from is not None:  # the base the interrupted run was trained on
            base_source = Path(runs.read_run_config(resume_from.parent.parent).init_from)
        else:
            base_source = runs.resolve_init_from(cfg.init_from, cfg.runs_root, exclude=run_dir, lora=True)
    elif not cfg.lora_train and cfg.init_from is not None and resume_from is None:
        base_source = runs.resolve_init_from(cfg.init_from, cfg.runs_root, exclude=run_dir, lora=False)
    if base_source is not None:
        base_weights = load_weights(base_source)
        log.info("base weights from %s", base_source)

    dataset = instantiate(cfg.data)  # data errors surface before any model is built
    set_seed(int(cfg.seed) + rank)  # distinct noise and timesteps per rank
    engine = build_engine(cfg, network_weights=base_weights, weights_source=str(base_source))  # or pretrained
    if main:  # only once the config has proven buildable
        runs.write_run_config(cfg, run_dir, init_from=base_source)
    engine.disable_untrainable_params()
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if cfg.mixed_precision != "no" and not fsdp:  # FSDP flattens each block and needs one dtype in it
        store_frozen_in(engine, HALF[cfg.mixed_precision])
    network = engine.network
    trainable = {k: p for k, p in network.named_parameters() if p.requires_grad}
    stray = [k for k, p in engine.named_parameters() if p.requires_grad and not k.startswith("model.diffusion_model.")]
    if stray:
        raise ValueError(f"only network parameters can be trained and checkpointed, but {stray[0]!r} is trainable; "
                         "add its prefix to not_trainable_prefixes")
    if not trainable:
        raise ValueError("no trainable network parameters (check not_trainable_prefixes and lora_train)")

    optimizer = instantiate(cfg.optim, params=list(trainable.values()))
    scheduler = make_scheduler(optimizer, cfg.scheduler.warmup_steps, cfg.max_steps, cfg.scheduler.decay,
                               cfg.scheduler.min_lr_ratio)
    ema = EMA(trainable, cfg.ema.decay) if cfg.ema.enabled else None

    state = TrainState(lora=bool(cfg.lora_train))
    if resume_from is not None:
        weights = load_weights(resume_from)
        own = lora_state_dict(network) if cfg.lora_train else network.state_dict()
        if set(weights) != set(own):
            raise ValueError(f"{resume_from}: its weights do not match this run's network "
                             "(was it saved with another network or lora_train setting?)")
        network.load_state_dict(weights, strict=False)
        if ema is not None:
            if not (resume_from / EMA_FILE).is_file():
                raise FileNotFoundError(f"{resume_from} has no {EMA_FILE} but ema.enabled=true")
            ema.load_state_dict(load_weights(resume_from / EMA_FILE))

    if fsdp and ema is not None:
        raise ValueError("ema.enabled=true is not supported with FSDP yet; set ema.enabled=false")
    model, optimizer = accelerator.prepare(engine, optimizer)
    if fsdp:  # FSDP re-creates the parameters it shards; clip the ones the optimizer now holds
        trainable = {f"p{i}": p for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    if resume_from is not None:  # after prepare: a sharded optimizer loads its own shard; RNG last
        state = load_training_state(resume_from, optimizer, scheduler, rank)
        log.info("resumed from %s at step %d", resume_from, state.step)
    stream = iter(batch_stream(dataset, cfg.batch_size, start=state.data_position, seed=cfg.seed, rank=rank,
                               world_size=world, num_workers=cfg.num_workers))
    tb = TensorBoard(run_dir / "tb") if main else None
    samples_per_step = cfg.batch_size * world * cfg.grad_accum_steps
    every = cfg.checkpoint.every
    final = None

    def network_weights() -> dict[str, torch.Tensor]:
        if not fsdp:
            return lora_state_dict(network) if cfg.lora_train else network.state_dict()
        prefix = "model.diffusion_model."  # gather the sharded network (collective: every rank calls it)
        full = {k[len(prefix):]: v for k, v in accelerator.get_state_dict(model).items() if k.startswith(prefix)}
        return {k: v for k, v in full.items() if "lora_" in k} if cfg.lora_train else full

    def checkpoint() -> Path:
        weights = network_weights()
        ema_state = ema.state_dict() if ema is not None else None
        return save_checkpoint(run_dir, state, weights, optimizer=optimizer, scheduler=scheduler,
                               ema_weights=ema_state, rank=rank, world_size=world, keep=cfg.checkpoint.keep,
                               barrier=accelerator.wait_for_everyone, sharded_optimizer=fsdp)

    model.train()
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", disable=not main, dynamic_ncols=True)
    window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
    while state.step < cfg.max_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.grad_accum_steps):
            batch = _to_device(next(stream), accelerator.device)
            sync = micro == cfg.grad_accum_steps - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                x, batch = engine.prepare_batch(batch)
                loss, _ = model(x, batch)
                accelerator.backward(loss / cfg.grad_accum_steps)
            step_loss += loss.detach() / cfg.grad_accum_steps
        clip = cfg.clip_grad_norm if cfg.clip_grad_norm else float("inf")
        grad_norm = accelerator.clip_grad_norm_(list(trainable.values()), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        state.step += 1
        state.data_position += samples_per_step

        window_loss += accelerator.reduce(step_loss, reduction="mean").item()
        window_steps += 1
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            scalars = {"train/loss": window_loss / window_steps, "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": float(grad_norm), "train/samples_per_sec":
                       window_steps * samples_per_step / elapsed}
            if main:
                tb.scalars(scalars, state.step)
                bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", sps=f"{scalars['train/samples_per_sec']:.1f}")
            window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
        if main and cfg.video_every and (state.step % cfg.video_every == 0 or state.step == cfg.max_steps):
            log_media(engine, batch, tb, state.step, ema, cfg)
        bar.update(1)
        if (every and state.step % every == 0) or state.step == cfg.max_steps:
            final = checkpoint()
    bar.close()
    if final is None:  # resumed a finished run
        final = latest_checkpoint(run_dir)
    if tb is not None:
        tb.close()
    accelerator.end_training()
    return final


@torch.no_grad()
def log_media(engine, batch: dict, tb: TensorBoard, step: int, ema: EMA | None, cfg: DictConfig) -> None:
    """Inputs, reconstructions and (EMA) samples as TensorBoard videos; conditionings as text."""
    engine.eval()
    rng = torch.get_rng_state()  # logging must not shift the training run's random stream
    try:
        with ema_weights(ema):
            videos = engine.log_video(batch, n=cfg.video_samples, num_steps=cfg.video_num_steps,
                                      generator=torch.Generator(device=batch_device(batch)).manual_seed(step))
        for key, video in videos.items():
            tb.video(f"video/{key}", video, step)
        for key, lines in engine.log_conditionings(batch, n=cfg.video_samples).items():
            tb.text(f"conditioning/{key}", lines, step)
    finally:
        torch.set_rng_state(rng)
        engine.train()


def batch_device(batch: dict) -> torch.device:
    return next(v.device for v in batch.values() if isinstance(v, torch.Tensor))
