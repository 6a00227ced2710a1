"""``fastclip train``: build the model, data, loss and optimiser, resume, train, evaluate, report.

    fastclip train                                   # embedded shapes set, small CLIP, CPU, ~3 min
    torchrun --nproc-per-node 8 -m fastclip.train --train-data 'shards/{0000..0999}.tar' ...
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastclip.train.args import parse_args
from fastclip.train.checkpoint import (CorruptCheckpointError, find_resume_checkpoint, load_weights_into,
                                      restore_rng_state)
from fastclip.train.distributed import DistributedContext, init_distributed, shutdown_distributed
from fastclip.train.loop import NonFiniteAbort, TrainParts, TrainState, run_epochs
from fastclip.train.metrics import MetricsLogger
from fastclip.train.optim import LearningRateSchedule, build_optimizer, find_parameter
from fastclip.train.precision import check_precision_supported, make_grad_scaler, parameter_dtype
from fastclip.train.profiling import NvtxRanges, StepProfiler

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

    model = fastclip.create_model(args.model, pretrained=args.pretrained, attn_impl=args.attn_impl,
                                  grad_checkpointing=args.grad_checkpointing, patch_dropout=args.patch_dropout,
                                  device=ctx.device, dtype=parameter_dtype(args.precision),
                                  image_size=args.force_image_size)
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


def resume_if_asked(args, ctx, parts: TrainParts) -> TrainState:
    """Load the checkpoint ``--resume`` names (or the newest valid one) into ``parts``; return the state."""
    if not args.resume:
        return TrainState()
    found = find_resume_checkpoint(args.resume, args.output_dir, log=lambda message: _say(ctx, "WARNING: " + message))
    if found is None:
        _say(ctx, f"--resume latest: no checkpoint in {args.output_dir}, starting from scratch")
        return TrainState()
    load_weights_into(parts.unwrapped, found.path)
    state = found.state
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.scaler is not None and state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    rng_states = state.get("rng", [])
    if state.get("world_size") == ctx.world_size and len(rng_states) > ctx.rank:
        restore_rng_state(rng_states[ctx.rank], ctx.device)
    else:
        _say(ctx, f"WARNING: the checkpoint was written by {state.get('world_size')} processes, this run has "
                  f"{ctx.world_size}: the data order and RNG streams restart (not step-exact)")
        seed_everything(args.seed + ctx.rank + found.step)
    _say(ctx, f"resumed from {found.path} (step {found.step})")
    return TrainState(**state["train"])


def _atomic_write_json(path: Path, payload: dict) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(descriptor, "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def run(args, ctx: DistributedContext) -> dict:
    """Train as ``args`` says; returns the results dict (rank 0 also writes results.json)."""
    wall_start = time.perf_counter()
    check_precision_supported(args.precision, ctx.device)
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
    total_steps = args.epochs * data.num_batches
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    parts = TrainParts(model=ddp_model, unwrapped=model, loss_fn=build_loss(args, ctx, model), optimizer=optimizer,
                       schedule=LearningRateSchedule(args.lr, args.warmup, total_steps, args.lr_scheduler),
                       scaler=make_grad_scaler(args.precision, ctx.device),
                       logit_scale=find_parameter(model, "logit_scale"), ctx=ctx, precision=args.precision,
                       accum_freq=args.accum_freq, grad_clip_norm=args.grad_clip_norm,
                       max_nonfinite_steps=args.max_nonfinite_steps, ranges=NvtxRanges(enabled=True),
                       trainable=[p for p in model.parameters() if p.requires_grad])
    state = resume_if_asked(args, ctx, parts)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    _say(ctx, f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
              f"{optimizer_name}, precision {args.precision}, {ctx.world_size} process(es) on {ctx.device}, "
              f"{data.num_batches} steps/epoch x {args.epochs} epochs of {args.batch_size * ctx.world_size} "
              f"samples, output {args.output_dir}")
    metrics = MetricsLogger(args.output_dir, is_main=ctx.is_main, report_to=args.report_to,
                            total_steps=total_steps, initial_step=state.step,
                            progress=not args.no_progress and sys.stderr.isatty())
    evaluate = functools.partial(_evaluate_embedded, args, ctx, model, embedded_root, eval_transform, tokenizer)
    on_epoch_end = None
    if embedded_root is not None and args.zeroshot_frequency:
        def on_epoch_end(epoch: int) -> None:
            if epoch % args.zeroshot_frequency == 0 and epoch < args.epochs:
                results = evaluate()
                if results:
                    metrics.log(state.step, {k: v for k, v in results.items() if "ensemble_top1" in k}, kind="zeroshot")
    profiler = StepProfiler(args.profile, args.output_dir, ctx.rank) if args.profile else None
    try:
        timing = run_epochs(parts, state, data, args, total_steps=total_steps, metrics=metrics,
                            profiler=profiler, on_epoch_end=on_epoch_end)
    finally:
        if profiler is not None:
            profiler.close()
        metrics.close()
    evaluation = evaluate() if embedded_root is not None else {}
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
        "world_size": ctx.world_size,
        "precision": args.precision,
        "model": args.model,
        "train_seconds": timing["train_seconds"],
        "wall_seconds": time.perf_counter() - wall_start,
        "evaluation": evaluation,
    }
    if ctx.is_main:
        _atomic_write_json(Path(args.output_dir) / "results.json", results)
        if embedded_root is not None:
            from fastclip.eval.embedded import format_report

            print(format_report(evaluation), flush=True)
        print(f"{state.step} steps, {timing['samples_per_second']:.0f} samples/s in training, "
              f"{results['wall_seconds']:.0f} s in all; results in {Path(args.output_dir) / 'results.json'}",
              flush=True)
    return results


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastclip train`` / ``python -m fastclip.train``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except ValueError as error:
        print(f"fastclip train: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args, init_distributed(args.device, args.dist_backend))
        return 0
    except NonFiniteAbort as error:
        print(f"fastclip train: aborted: {error}", file=sys.stderr)
        return 3
    except (ValueError, ImportError, CorruptCheckpointError) as error:  # user-fixable: say what to change
        print(f"fastclip train: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
