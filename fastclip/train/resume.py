"""Resuming: load the checkpoint the run plan names into the parts, and where training stands."""
from __future__ import annotations

from fastclip.data.loader import TrainBatches
from fastclip.distributed.comm import World
from fastclip.train.build import seed_everything
from fastclip.train.checkpoint import (MODEL_FILE, CorruptCheckpointError, LoadedCheckpoint, load_training_checkpoint,
                                       load_weights_into, restore_rng_state)
from fastclip.train.config import TrainConfig
from fastclip.train.fsdp import is_sharded
from fastclip.train.loop import TrainParts, TrainState
from fastclip.train.process_group import all_or_none, say
from fastclip.train.run_dir import RunPlan
from fastclip.train.sharded_checkpoint import restore_model_and_optimizer


def planned_total_steps(config: TrainConfig, data: TrainBatches, state: TrainState) -> int:
    """Steps taken plus the steps left in ``--epochs`` (capped by ``--max-steps``).

    That is ``epochs * batches per epoch`` unless a resume changed the batch size or process count.
    """
    remaining = (config.epochs - state.epoch) * data.num_batches - state.batch_in_epoch
    total = state.step + max(remaining, 0)
    return min(total, config.max_steps) if config.max_steps else total


def resume_if_asked(config: TrainConfig, ctx: World, parts: TrainParts, data: TrainBatches,
                    plan: RunPlan, loaded: LoadedCheckpoint | None) -> TrainState:
    """Load the checkpoint ``plan`` names into ``parts`` on every rank; return the training state.

    ``loaded`` is rank 0's copy (already verified by :func:`~fastclip.train.run_dir.prepare_output`). A
    failure on any rank (a mismatched model, a file another node cannot read) stops every rank with the
    same error.
    """
    if plan.resume_path is None:
        return TrainState()
    found = all_or_none(ctx, lambda: _restore(config, parts, loaded or load_training_checkpoint(plan.resume_path)))
    state = found.state
    train = TrainState(**{key: value for key, value in state["train"].items()
                          if key in TrainState.__dataclass_fields__})
    saved_world, saved_batch = state["world_size"], state.get("batch_size", config.batch_size)
    if saved_world == ctx.size and saved_batch == config.batch_size and len(state["rng"]) > ctx.rank:
        restore_rng_state(state["rng"][ctx.rank], ctx.device)
    else:
        # Every epoch's global sample order (map-style data) is one (seed, epoch) permutation, whatever the
        # batch shape: go on from the same sample of it. Webdataset shards are dealt per rank: only the count holds.
        consumed = train.batch_in_epoch * saved_batch * saved_world
        train.batch_in_epoch = consumed // (config.batch_size * ctx.size)
        restart = train.batch_in_epoch * config.batch_size * ctx.size  # a whole batch of the new shape
        if train.batch_in_epoch >= data.num_batches:
            train.epoch, train.batch_in_epoch = train.epoch + 1, 0
        where = (f"Training goes on from sample {restart} of the epoch's order ({consumed} were trained; a batch of "
                 "the new shape starts at a multiple of its size)" if not data.iterable else
                 f"Training skips the first {restart} samples of the epoch, but the webdataset shards are dealt to "
                 "the ranks anew, so they are not the samples the earlier run saw")
        say(ctx, f"WARNING: NOT STEP-EXACT: {found.path} was written with --batch-size {saved_batch} on "
                 f"{saved_world} process(es), this run has --batch-size {config.batch_size} on {ctx.size}. "
                 f"{where}; the batches, the schedule and the random streams (reseeded from --seed, rank and step) "
                 "differ from an uninterrupted run. Resume with the same batch size and process count for a "
                 "step-exact continuation.")
        seed_everything(config.seed + ctx.rank + found.step)
    say(ctx, f"resumed from {found.path} (step {found.step})")
    return train


def _restore(config: TrainConfig, parts: TrainParts, found: LoadedCheckpoint) -> LoadedCheckpoint:
    """Check that checkpoint ``found`` fits this run, then load its weights, optimiser and scaler."""
    if found.model_name and found.model_name != config.model:
        weights = found.path if found.sharded else found.path / MODEL_FILE
        raise ValueError(f"{found.path} was trained with --model {found.model_name}, this run has --model "
                         f"{config.model}: resume with --model {found.model_name}, or start from its weights in a "
                         f"new --output-dir with --pretrained {weights} (no --resume)")
    if not isinstance(found.state["train"].get("step"), int):
        raise CorruptCheckpointError(f"{found.path}: its training state has no step")
    through_dcp = found.sharded or is_sharded(parts.unwrapped)
    if through_dcp:  # shards in, or a sharded model: torch.distributed.checkpoint's state-dict API
        restore_model_and_optimizer(parts, found)
    else:
        load_weights_into(parts.unwrapped, found.path)
    try:
        if not through_dcp:
            parts.optimizer.load_state_dict(found.state["optimizer"])
        if parts.scaler is not None and found.state.get("scaler"):
            parts.scaler.load_state_dict(found.state["scaler"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"the optimiser state in {found.path} does not fit this run ({error}); resume with the "
                         "flags of the run that wrote it") from None
    return found
