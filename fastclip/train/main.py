"""``fastclip train``: build the model, data, loss and optimiser, resume, train, evaluate, report.

    fastclip train                                   # embedded shapes set, small CLIP, CPU, ~3 min
    torchrun --nproc-per-node 8 -m fastclip.train --train-data 'shards/{0000..0999}.tar' ...
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastclip.io import atomic_write_json
from fastclip.model.config import get_config
from fastclip.train.args import parse_args
from fastclip.train.checkpoint import (MODEL_FILE, CorruptCheckpointError, load_checkpoint, load_weights_into,
                                      read_weights, restore_rng_state)
from fastclip.train.distributed import DistributedContext, init_distributed, is_peer_failure, shutdown_distributed
from fastclip.train.folder_zeroshot import evaluate_folder
from fastclip.train.lit import apply_locks
from fastclip.train.loop import NonFiniteAbort, TrainParts, TrainState, run_epochs
from fastclip.train.metrics import MetricsLogger, plain_progress_interval
from fastclip.train.optim import LearningRateSchedule, build_optimizer, find_parameter
from fastclip.train.precision import check_precision_supported, make_grad_scaler, parameter_dtype
from fastclip.train.profiling import NvtxRanges, StepProfiler
from fastclip.train.run_dir import RESULTS_FILE, RunPlan, prepare_output

logger = logging.getLogger("fastclip.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _say(ctx: DistributedContext, message: str) -> None:
    if ctx.is_main:
        print(message, flush=True)


def build_model(args, ctx: DistributedContext):
    import fastclip

    def create(pretrained=None):
        return fastclip.create_model(args.model, pretrained=pretrained, attn_impl=args.attn_impl,
                                     grad_checkpointing=args.grad_checkpointing, patch_dropout=args.patch_dropout,
                                     device=ctx.device, dtype=parameter_dtype(args.precision),
                                     image_size=args.force_image_size)

    model = read_weights(args.pretrained, create) if args.pretrained else create()
    for note in apply_locks(model, args):
        _say(ctx, note)
    image_size = model.config.vision.image_size
    return model, image_size, model.context_length


def build_loss(args, ctx: DistributedContext, model):
    from fastclip.loss import ClipLoss, SigLipLoss

    if args.siglip:
        if not hasattr(model, "logit_bias") or model.logit_bias is None:
            raise ValueError(f"--siglip needs a model with a learned logit_bias; {args.model} has none "
                             "(use e.g. --model fastclip-tiny-siglip)")
        return SigLipLoss(rank=ctx.rank, world_size=ctx.world_size)
    return ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                    rank=ctx.rank, world_size=ctx.world_size)


def build_train_data(args, ctx: DistributedContext, image_size: int, context_length: int):
    """(TrainBatches, eval transform, tokenizer, embedded-set folder or None)."""
    import fastclip
    from fastclip.data.loader import TrainBatches

    tokenizer = functools.partial(fastclip.tokenize, context_length=context_length, truncate=True)
    eval_transform = fastclip.image_transform(image_size, train=False)
    augment = not (args.no_augment or args.embedded)
    train_transform = fastclip.image_transform(image_size, train=True) if augment else eval_transform
    embedded_root = None
    if args.embedded:
        embedded_root = prepare_embedded_set(args, ctx, image_size)
        args.train_data = str(embedded_root / "train.csv")
        args.csv_separator, args.csv_img_key, args.csv_caption_key = "\t", "filepath", "title"
    if args.dataset_type == "csv":
        from fastclip.data.csv_dataset import CsvDataset

        dataset = CsvDataset(args.train_data, train_transform, tokenizer, img_key=args.csv_img_key,
                             caption_key=args.csv_caption_key, separator=args.csv_separator, seed=args.seed,
                             seed_augmentation=augment)
    elif args.dataset_type == "synthetic":
        from fastclip.data.synthetic import SyntheticShapesDataset

        dataset = SyntheticShapesDataset(args.train_num_samples, train_transform, tokenizer,
                                         image_size=image_size, seed=args.seed)
    else:
        from fastclip.data.webdataset_dataset import WebDatasetPairs

        dataset = WebDatasetPairs(args.train_data, train_transform, tokenizer, rank=ctx.rank,
                                  world_size=ctx.world_size, seed=args.seed)
    data = TrainBatches(dataset, args.batch_size, rank=ctx.rank, world_size=ctx.world_size, seed=args.seed,
                        workers=args.workers, pin_memory=ctx.device.type == "cuda",
                        num_samples=args.train_num_samples if args.dataset_type == "webdataset" else None)
    return data, eval_transform, tokenizer, embedded_root


def prepare_embedded_set(args, ctx: DistributedContext, image_size: int) -> Path:
    from fastclip.data.shapes import ShapesConfig, ensure_shapes_dataset

    config = ShapesConfig(image_size=image_size)
    if args.embedded_train_size:
        config = dataclasses.replace(config, train_size=args.embedded_train_size)
    if args.embedded_val_size:
        val = args.embedded_val_size
        config = dataclasses.replace(config, val_seen_size=val, val_unseen_size=max(64, val // 2),
                                     val_shifted_size=val)
    root = None
    if ctx.is_main:
        root = ensure_shapes_dataset(config, args.cache_dir, log=lambda message: _say(ctx, message))
    ctx.barrier()
    return ensure_shapes_dataset(config, args.cache_dir) if root is None else root


def planned_total_steps(args, data, state: TrainState) -> int:
    """Steps taken plus the steps left in ``--epochs`` (capped by ``--max-steps``).

    That is ``epochs * batches per epoch`` unless a resume changed the batch size or process count.
    """
    remaining = (args.epochs - state.epoch) * data.num_batches - state.batch_in_epoch
    total = state.step + max(remaining, 0)
    return min(total, args.max_steps) if args.max_steps else total


def _prepare_output(args, ctx: DistributedContext):
    """Rank 0 checks the output folder and picks the checkpoint (run_dir.py); every rank gets the plan."""
    holder = {}

    def decide() -> RunPlan:
        plan, holder["loaded"] = prepare_output(args)
        return plan

    plan = ctx.decide_on_main(decide)
    for note in plan.notes:
        _say(ctx, note)
    return plan, holder.get("loaded")


def resume_if_asked(args, ctx, parts: TrainParts, data, plan: RunPlan, loaded) -> TrainState:
    """Load the checkpoint ``plan`` names into ``parts`` on every rank; return the training state.

    ``loaded`` is rank 0's copy (already verified by :func:`prepare_output`). A failure on any rank
    (a mismatched model, a file another node cannot read) stops every rank with the same error.
    """
    if plan.resume_path is None:
        return TrainState()
    found = ctx.all_or_none(lambda: _restore(args, parts, loaded or load_checkpoint(plan.resume_path)))
    state = found.state
    train = TrainState(**{key: value for key, value in state["train"].items()
                          if key in TrainState.__dataclass_fields__})
    saved_world, saved_batch = state["world_size"], state.get("batch_size", args.batch_size)
    if saved_world == ctx.world_size and saved_batch == args.batch_size and len(state["rng"]) > ctx.rank:
        restore_rng_state(state["rng"][ctx.rank], ctx.device)
    else:
        # Every epoch's global sample order is one (seed, epoch) permutation, whatever the batch shape:
        # go on from the same sample of it.
        consumed = train.batch_in_epoch * saved_batch * saved_world
        train.batch_in_epoch = consumed // (args.batch_size * ctx.world_size)
        if train.batch_in_epoch >= data.num_batches:
            train.epoch, train.batch_in_epoch = train.epoch + 1, 0
        _say(ctx, f"WARNING: NOT STEP-EXACT: {found.path} was written with --batch-size {saved_batch} on "
                  f"{saved_world} process(es), this run has --batch-size {args.batch_size} on {ctx.world_size}. "
                  f"Training goes on after sample {consumed} of the epoch's order, but the batches, the schedule "
                  "and the random streams differ from an uninterrupted run. Resume with the same batch size and "
                  "process count for a step-exact continuation.")
        seed_everything(args.seed + ctx.rank + found.step)
    _say(ctx, f"resumed from {found.path} (step {found.step})")
    return train


def _restore(args, parts: TrainParts, found):
    """Check that checkpoint ``found`` fits this run, then load its weights, optimiser and scaler."""
    if found.model_name and found.model_name != args.model:
        raise ValueError(f"{found.path} was trained with --model {found.model_name}, this run has --model "
                         f"{args.model}: resume with --model {found.model_name}, or start from its weights in a new "
                         f"--output-dir with --pretrained {found.path / MODEL_FILE} (no --resume)")
    if not isinstance(found.state["train"].get("step"), int):
        raise CorruptCheckpointError(f"{found.path}: its training state has no step")
    load_weights_into(parts.unwrapped, found.path)
    try:
        parts.optimizer.load_state_dict(found.state["optimizer"])
        if parts.scaler is not None and found.state.get("scaler"):
            parts.scaler.load_state_dict(found.state["scaler"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"the optimiser state in {found.path} does not fit this run ({error}); resume with the "
                         "flags of the run that wrote it") from None
    return found


def run(args, ctx: DistributedContext) -> dict:
    """Train as ``args`` says; returns the results dict (rank 0 also writes results.json)."""
    wall_start = time.perf_counter()
    check_precision_supported(args.precision, ctx.device)
    get_config(args.model)  # an unknown --model: the list of names, before anything is written
    plan, loaded = _prepare_output(args, ctx)  # before anything slow: a refused folder costs nothing
    args.output_dir = plan.output_dir
    seed_everything(args.seed)  # identical initial weights on every rank
    model, image_size, context_length = build_model(args, ctx)
    data, eval_transform, tokenizer, embedded_root = build_train_data(args, ctx, image_size, context_length)
    seed_everything(args.seed + ctx.rank)  # different dropout masks per rank
    ddp_model = model
    if ctx.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer, optimizer_name = build_optimizer(model, lr=args.lr, weight_decay=args.wd,
                                                betas=(args.beta1, args.beta2), eps=args.eps)
    loss_fn = build_loss(args, ctx, model)
    if args.torchcompile:
        from fastclip.train.compile import compile_model_and_loss

        ddp_model, loss_fn = compile_model_and_loss(ddp_model, loss_fn, distributed=ctx.distributed)
    parts = TrainParts(model=ddp_model, unwrapped=model, loss_fn=loss_fn, optimizer=optimizer,
                       schedule=None, scaler=make_grad_scaler(args.precision, ctx.device),
                       logit_scale=find_parameter(model, "logit_scale"), ctx=ctx, precision=args.precision,
                       accum_freq=args.accum_freq, grad_clip_norm=args.grad_clip_norm,
                       max_nonfinite_steps=args.max_nonfinite_steps, ranges=NvtxRanges(enabled=True),
                       trainable=[p for p in model.parameters() if p.requires_grad],
                       lineage={"run_id": plan.run_id, "parent": plan.parent})
    state = resume_if_asked(args, ctx, parts, data, plan, loaded)
    total_steps = planned_total_steps(args, data, state)
    parts.schedule = LearningRateSchedule(args.lr, args.warmup, total_steps, args.lr_scheduler)
    del loaded  # rank 0's copy of the optimiser state
    _say(ctx, f"model {args.model} ({_parameter_summary(model)}), {optimizer_name}, precision {args.precision}, "
              f"{ctx.world_size} process(es) on {ctx.device}, {_schedule_summary(args, data, state, total_steps)} of "
              f"{args.batch_size * ctx.world_size} samples, output {args.output_dir}")
    plain_every = (plain_progress_interval(total_steps) if args.progress_every_n_steps is None
                   else args.progress_every_n_steps)
    metrics = MetricsLogger(args.output_dir, is_main=ctx.is_main, report_to=args.report_to,
                            total_steps=total_steps, initial_step=state.step,
                            progress=not args.no_progress and sys.stderr.isatty(),
                            plain_every=0 if sys.stdout.isatty() else plain_every,
                            say=lambda message: _say(ctx, message))
    evaluate = functools.partial(_evaluate_embedded, args, ctx, model, embedded_root, eval_transform, tokenizer)
    evaluate_folder_now = functools.partial(evaluate_folder, args, ctx, model, eval_transform, tokenizer,
                                            metrics.announce)
    on_epoch_end = None
    if (embedded_root is not None or args.imagenet_val) and args.zeroshot_frequency:
        def on_epoch_end(epoch: int) -> None:
            if epoch % args.zeroshot_frequency == 0 and epoch < args.epochs and state.step < total_steps:
                results = {}
                if embedded_root is not None:
                    results = {k: v for k, v in evaluate().items() if "ensemble_top1" in k}
                    if results:
                        metrics.announce(f"zero-shot after epoch {epoch} (step {state.step}): ensemble top-1 " +
                                         ", ".join(f"{key.split('/')[0]} {100 * value:.1f}%"
                                                   for key, value in results.items()))
                if args.imagenet_val:
                    results.update(evaluate_folder_now())
                if results:
                    metrics.log(state.step, results, kind="zeroshot")
    profiler = StepProfiler(args.profile, args.output_dir, ctx.rank) if args.profile else None
    try:
        timing = run_epochs(parts, state, data, args, total_steps=total_steps, metrics=metrics,
                            profiler=profiler, on_epoch_end=on_epoch_end)
    finally:
        if profiler is not None:
            profiler.close()
        metrics.close()
    evaluation = evaluate() if embedded_root is not None else {}
    if args.imagenet_val:
        evaluation.update(evaluate_folder_now())
    if args.val_data and not args.embedded:
        evaluation.update(_evaluate_val_data(args, ctx, model, eval_transform, tokenizer))
    results = {
        "zeroshot_top1": evaluation.get("val_seen/ensemble_top1"),
        "zeroshot_top5": evaluation.get("val_seen/ensemble_top5"),
        "steps": state.step,
        "samples_per_second": timing["samples_per_second"],
        "samples_seen": state.samples_seen,
        "nonfinite_steps": state.nonfinite_total,
        "skipped_images": sum(ctx.gather_objects(state.skipped_images)),
        "skipped_rows": len(getattr(data.dataset, "skipped_rows", ())),
        "world_size": ctx.world_size,
        "precision": args.precision,
        "model": args.model,
        "train_seconds": timing["train_seconds"],
        "wall_seconds": time.perf_counter() - wall_start,
        "evaluation": evaluation,
    }
    if ctx.is_main:
        atomic_write_json(Path(args.output_dir) / RESULTS_FILE, results)  # a NaN (no step trained) becomes null
        if embedded_root is not None:
            from fastclip.eval.embedded import format_report

            print(format_report(evaluation), flush=True)
        speed = (f"{timing['samples_per_second']:.0f} samples/s in training" if timing["trained_samples"]
                 else "no step left to train")
        print(f"{state.step} steps, {speed}, {results['wall_seconds']:.0f} s in all; results in "
              f"{Path(args.output_dir) / RESULTS_FILE}", flush=True)
    return results



def _parameter_summary(model: torch.nn.Module) -> str:
    """``12.4 M parameters`` or, with locked towers, ``12.4 M parameters, 3.1 M trainable``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = f"{total / 1e6:.1f} M parameters"
    return text if trainable == total else f"{text}, {trainable / 1e6:.1f} M trainable"


def _schedule_summary(args, data, state: TrainState, total_steps: int) -> str:
    """``375 steps/epoch x 3 epochs``, and how many steps this run takes when --max-steps or a resume changes it."""
    text = f"{data.num_batches} steps/epoch x {args.epochs} epochs"
    if total_steps != data.num_batches * args.epochs or state.step:
        reason = " (--max-steps)" if args.max_steps and total_steps == args.max_steps else ""
        text += f", {total_steps} steps in all{reason}"
        if state.step:
            text += f" from step {state.step}"
    return text


def _evaluate_embedded(args, ctx, model, root, transform, tokenizer) -> dict:
    """Zero-shot/retrieval report on rank 0 (the others wait); {} elsewhere."""
    results = {}
    if ctx.is_main:
        from fastclip.eval.embedded import evaluate_embedded

        results = evaluate_embedded(model, root, transform=transform, tokenizer=tokenizer, device=ctx.device,
                                    precision=args.precision, workers=min(args.workers, 2))
        model.train()
    ctx.barrier()
    return results


def _evaluate_val_data(args, ctx, model, transform, tokenizer) -> dict:
    """Image<->text recall@1/5/10 on the --val-data pairs (rank 0; identical captions count as one)."""
    results = {}
    if ctx.is_main:
        from fastclip.data.collate import collate_pairs
        from fastclip.data.csv_dataset import CsvDataset
        from fastclip.eval.features import encode_images, encode_texts
        from fastclip.eval.retrieval import caption_groups, retrieval_recall

        dataset = CsvDataset(args.val_data, transform, tokenizer, img_key=args.csv_img_key,
                             caption_key=args.csv_caption_key, separator=args.csv_separator)
        loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=min(args.workers, 2),
                                             collate_fn=collate_pairs)
        image_features = encode_images(model, loader, ctx.device, args.precision)
        text_features = encode_texts(model, dataset.captions, tokenizer, ctx.device, args.precision)
        recalls = retrieval_recall(image_features, text_features, groups=caption_groups(dataset.captions))
        results = {f"val/{key}": value for key, value in recalls.items()}
        print("validation retrieval: " + ", ".join(f"{key} {100 * value:.1f}%" for key, value in recalls.items()),
              flush=True)
        model.train()
    ctx.barrier()
    return results


def _user_message(error: BaseException) -> str:
    """The error's text, without the traceback a DataLoader worker wraps around an exception it re-raises."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        lines = text.rstrip().splitlines()
        for index in range(len(lines) - 1, 0, -1):
            head, _, rest = lines[index].partition(": ")
            if rest and not lines[index].startswith(" ") and head.replace(".", "").replace("_", "").isalnum():
                return " ".join([rest, *lines[index + 1:]]) + " (raised in a DataLoader worker)"
    return text


#: OSErrors that the machine causes, not fastclip: disk full, quota, read-only file system, permissions
_ENVIRONMENT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastclip train`` / ``python -m fastclip.train``; returns the exit status.

    0: done. 2: a user error (flags, paths, data, checkpoints) or a full/read-only disk, with the fix.
    3: training diverged (too many non-finite steps). 4: another process stalled or died
    (``--dist-timeout``). A traceback means a bug in fastclip.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except ValueError as error:
        print(f"fastclip train: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args, init_distributed(args.device, args.dist_backend, args.dist_timeout))
        return 0
    except NonFiniteAbort as error:
        print(f"fastclip train: aborted: {error}", file=sys.stderr)
        return 3
    except (ValueError, ImportError) as error:  # user-fixable: say what to change
        print(f"fastclip train: {type(error).__name__}: {_user_message(error)}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if not is_peer_failure(error):
            raise
        print(f"fastclip train: rank {os.environ.get('RANK', '0')}: a collective operation failed because another "
              f"process stalled or died ({str(error).splitlines()[0]}). Collectives wait at most --dist-timeout "
              f"{args.dist_timeout:g} s; the other processes' logs say which one failed first. If a step, a "
              "checkpoint write or the evaluation on rank 0 legitimately takes longer, raise --dist-timeout.",
              file=sys.stderr)
        return 4
    except OSError as error:
        if error.errno not in _ENVIRONMENT_ERRORS:
            raise
        print(f"fastclip train: {error.strerror}: {error.filename or error}; free space or choose another "
              "--output-dir (checkpoints already saved are untouched)", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
