"""The training loop: steps, the guarded optimiser update, checkpoints and periodic evaluation."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastclip.data.image_io import UnreadableDataError
from fastclip.data.loader import TrainBatches
from fastclip.distributed.comm import World
from fastclip.train.accumulation import forward_backward
from fastclip.train.checkpoint import capture_rng_state, save_checkpoint
from fastclip.train.config import TrainConfig
from fastclip.train.metrics import MetricsLogger
from fastclip.train.optim import LearningRateSchedule, clamp_logit_scale
from fastclip.train.process_group import all_or_none, any_true, gather_objects
from fastclip.train.preemption import StopRequest
from fastclip.train.profiling import NvtxRanges, StepProfiler


class NonFiniteAbort(RuntimeError):
    """Too many non-finite steps in a row: the run is diverging, not hitting a one-off bad batch."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (plain ints)."""

    step: int = 0                # steps taken, skipped ones included (the schedule follows this)
    epoch: int = 0
    batch_in_epoch: int = 0      # next batch of ``epoch`` to train on
    samples_seen: int = 0        # global samples trained on
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    skipped_images: int = 0      # unreadable images replaced (this rank)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainParts:
    """Everything one step needs. ``model`` may be DDP-wrapped; ``unwrapped`` is the bare model."""

    model: torch.nn.Module
    unwrapped: torch.nn.Module
    loss_fn: torch.nn.Module     # fastclip.loss.ClipLoss or SigLipLoss
    optimizer: torch.optim.Optimizer
    schedule: LearningRateSchedule | None  # set once the total step count is known (after a resume)
    scaler: torch.amp.GradScaler | None    # precision "amp" only
    logit_scale: torch.nn.Parameter | None
    ctx: World
    precision: str
    accum_freq: int = 1
    grad_clip_norm: float | None = None
    max_nonfinite_steps: int = 20
    ranges: NvtxRanges | None = None
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    lineage: dict[str, object] = field(default_factory=dict)  # {"run_id", "parent"} in each checkpoint (run_dir.py)
    checkpoint_layout: str = "full"  # "sharded" with --fsdp-checkpoint sharded (train/sharded_checkpoint.py)


def _no_ranges(name: str):
    return contextlib.nullcontext()


def _gradient_norm(parameters: list, max_norm: float | None) -> torch.Tensor:
    """Total L2 norm of the gradients (clipping them to ``max_norm`` when given)."""
    grads = [p for p in parameters if p.grad is not None]
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm, error_if_nonfinite=False)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads], error_if_nonfinite=False)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor


def optimizer_update(parts: TrainParts, loss: torch.Tensor) -> tuple[bool, float]:
    """Unscale, check, clip and apply the gradients. Returns (applied, gradient norm).

    A step whose loss or gradient norm is not finite (on any rank) is skipped: the gradients are
    dropped, the parameters and optimiser state stay as they were (with ``amp`` the GradScaler also
    lowers its scale).
    """
    if parts.scaler is not None:
        parts.scaler.unscale_(parts.optimizer)
    grad_norm = _gradient_norm(parts.trainable, parts.grad_clip_norm)
    finite = bool(torch.isfinite(loss).item()) and bool(torch.isfinite(grad_norm).item())
    finite = not any_true(parts.ctx, not finite)
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)  # skips the update itself when it found inf/NaN
        parts.scaler.update()
    elif finite:
        parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    if finite:
        clamp_logit_scale(parts.logit_scale)
    return finite, float(grad_norm)


def train_step(parts: TrainParts, state: TrainState, images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """One step on this rank's batch: forward/backward, guarded update, bookkeeping. Returns metrics."""
    lr = parts.schedule.apply(parts.optimizer, state.step)
    loss = forward_backward(parts.model, parts.loss_fn, images, tokens, precision=parts.precision,
                            device=parts.ctx.device, accum_freq=parts.accum_freq, scaler=parts.scaler,
                            ranges=parts.ranges)
    ranges = parts.ranges or _no_ranges
    with ranges("optimizer"):
        applied, grad_norm = optimizer_update(parts, loss)
    state.step += 1
    state.samples_seen += images.shape[0] * parts.ctx.size
    if applied:
        state.nonfinite_in_row = 0
    else:
        state.nonfinite_total += 1
        state.nonfinite_in_row += 1
        if state.nonfinite_in_row >= parts.max_nonfinite_steps:
            raise NonFiniteAbort(
                f"{state.nonfinite_in_row} steps in a row had a non-finite loss or gradient (last loss "
                f"{loss.item()}, gradient norm {grad_norm}) at step {state.step}; training is diverging. "
                "Lower --lr, raise --warmup, set --grad-clip-norm 1.0, or use --precision amp_bf16/fp32 "
                "instead of fp16; --max-nonfinite-steps sets this limit.")
    scale = parts.logit_scale.detach().exp().item() if parts.logit_scale is not None else float("nan")
    return {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm, "logit_scale": scale,
            "skipped_step": int(not applied)}


def checkpoint_state(parts: TrainParts, state: TrainState, batch_size: int) -> dict:
    """The non-weight part of a checkpoint. Collective: every rank must call it (RNG gather)."""
    rng_states = gather_objects(parts.ctx, capture_rng_state(parts.ctx.device))
    return {
        "batch_size": batch_size,  # per process; with world_size, what step-exact resume needs
        "train": state.to_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else {},
        "schedule": parts.schedule.state_dict(),
        "rng": rng_states,
        "world_size": parts.ctx.size,
    }


def save(parts: TrainParts, state: TrainState, config: TrainConfig, *, most_recent_only: bool = False) -> None:
    """Save a checkpoint of the current step (rank 0 writes; all ranks take part, and all raise if it fails).

    ``most_recent_only``: written only for ``--save-most-recent``; the next checkpoint replaces it. Any
    checkpoint written retires the earlier most-recent-only ones of this lineage (full layout; a sharded
    checkpoint is always kept).
    """
    from fastclip.train.fsdp import is_sharded

    if is_sharded(parts.unwrapped) or parts.checkpoint_layout == "sharded":
        from fastclip.train.sharded_checkpoint import save_fsdp_checkpoint

        return save_fsdp_checkpoint(parts, state, config)
    payload = checkpoint_state(parts, state, config.batch_size)

    def write() -> None:
        if parts.ctx.is_main:
            details = {**checkpoint_details(parts, config), "most_recent_only": most_recent_only}
            save_checkpoint(config.output_dir, state.step, parts.unwrapped, payload, model_name=config.model,
                            run_id=parts.lineage.get("run_id"), parent=parts.lineage.get("parent"),
                            details=details, keep_last=config.keep_last)

    all_or_none(parts.ctx, write)


def checkpoint_details(parts: TrainParts, config: TrainConfig) -> dict:
    """The manifest fields that describe the run: batch and world size, accumulation, when."""
    return {"batch_size": config.batch_size, "world_size": parts.ctx.size, "accum_freq": parts.accum_freq,
            "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run_epochs(parts: TrainParts, state: TrainState, data: TrainBatches, config: TrainConfig, *, total_steps: int,
               metrics: MetricsLogger, profiler: StepProfiler | None = None,
               on_epoch_end: Callable[[int], None] | None = None, stop: StopRequest | None = None) -> dict:
    """Train from ``state`` until ``total_steps`` or the last epoch, or until ``stop`` is requested on any rank
    (then after the step in flight, with a checkpoint of it). Returns timing totals and ``stopped_by`` (the
    signal's name, or None)."""
    ranges = parts.ranges or _no_ranges
    parts.model.train()
    train_seconds, trained_samples = 0.0, 0
    last_saved = state.step
    stopped = False
    while state.epoch < config.epochs and state.step < total_steps and not stopped:
        batches = data.epoch(state.epoch, start_batch=state.batch_in_epoch)
        while state.step < total_steps:
            start = time.perf_counter()
            with ranges("data"):
                batch = next(batches, None)
                if batch is None:
                    if state.batch_in_epoch < data.num_batches:  # never loop on a source that ran dry
                        raise UnreadableDataError(
                            f"the training data ended after batch {state.batch_in_epoch} of epoch {state.epoch}, "
                            f"short of the {data.num_batches} batches an epoch holds; check --train-num-samples "
                            "and the data")
                    break
                images, tokens, skipped = batch
                images = images.to(parts.ctx.device, non_blocking=True)
                tokens = tokens.to(parts.ctx.device, non_blocking=True)
            data_seconds = time.perf_counter() - start
            values = train_step(parts, state, images, tokens)
            state.batch_in_epoch += 1
            state.skipped_images += skipped
            seconds = time.perf_counter() - start
            train_seconds += seconds
            trained_samples += images.shape[0] * parts.ctx.size
            if profiler is not None:
                profiler.step()
            if state.step % config.log_every_n_steps == 0 or state.step == total_steps:
                values.update(epoch=state.epoch, data_time=data_seconds, step_time=seconds,
                              samples_per_second=images.shape[0] * parts.ctx.size / seconds,
                              nonfinite_total=state.nonfinite_total, skipped_images=state.skipped_images)
                metrics.log(state.step, values)
            metrics.progress(1, loss=values["loss"], samples_s=images.shape[0] * parts.ctx.size / seconds)
            if config.save_every_n_steps and state.step % config.save_every_n_steps == 0:
                save(parts, state, config)
                last_saved = state.step
            if stop is not None and state.step < total_steps and any_true(parts.ctx, stop.requested):  # all ranks
                stopped = True
                break
        if state.batch_in_epoch >= data.num_batches and not stopped:
            state.epoch += 1
            state.batch_in_epoch = 0
            scheduled = config.save_frequency and state.epoch % config.save_frequency == 0
            if (scheduled or config.save_most_recent) and last_saved != state.step:
                save(parts, state, config, most_recent_only=not scheduled)
                last_saved = state.step
            if on_epoch_end is not None:
                on_epoch_end(state.epoch)
    if last_saved != state.step and (config.save_frequency or config.save_every_n_steps or stopped):
        save(parts, state, config)
    rate = trained_samples / train_seconds if train_seconds > 0 else math.nan
    return {"train_seconds": train_seconds, "trained_samples": trained_samples, "samples_per_second": rate,
            "stopped_by": (stop.signal_name or "a signal on another rank") if stopped else None}
