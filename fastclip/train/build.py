"""What a run is made of, built from its :class:`~fastclip.train.config.TrainConfig`: model, loss, data, parts."""
from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fastclip.checkpoint_format import read_weights
from fastclip.data.loader import TrainBatches
from fastclip.distributed.comm import World
from fastclip.precision import make_grad_scaler
from fastclip.train.config import TrainConfig
from fastclip.train.lit import apply_locks
from fastclip.train.loop import TrainParts
from fastclip.train.optim import build_optimizer, find_parameter
from fastclip.train.process_group import barrier, say
from fastclip.train.profiling import NvtxRanges


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(config: TrainConfig, ctx: World) -> torch.nn.Module:
    """The CLIP of ``config.model`` on ``ctx.device``, random or from ``config.pretrained`` (what
    ``fastclip.create_model(pretrained=...)`` takes)."""
    import fastclip

    def create(pretrained=None):
        return fastclip.create_model(config.model, pretrained=pretrained, attn_impl=config.attn_impl,
                                     grad_checkpointing=config.grad_checkpointing,
                                     patch_dropout=config.patch_dropout, device=ctx.device,
                                     precision=config.precision, image_size=config.force_image_size,
                                     context_length=config.force_context_length)

    if not config.pretrained:
        model = create()
    else:
        from fastclip.model.pretrained import resolve_pretrained

        # a file, a checkpoint folder or a cached open_clip tag; a damaged file is named in the error
        found = resolve_pretrained(config.pretrained, config.model)
        model = read_weights(found.path, lambda path: create(config.pretrained))
    for note in apply_locks(model, config):  # before the optimiser: it holds no state for frozen parameters
        say(ctx, note)
    return model


def build_loss(config: TrainConfig, ctx: World, model: torch.nn.Module) -> torch.nn.Module:
    from fastclip.loss import ClipLoss, SigLipLoss

    if config.siglip:
        if not hasattr(model, "logit_bias") or model.logit_bias is None:
            raise ValueError(f"--siglip needs a model with a learned logit_bias; {config.model} has none "
                             "(use e.g. --model fastclip-tiny-siglip)")
        return SigLipLoss(rank=ctx.rank, world_size=ctx.size, dist_impl=config.loss_dist_impl)
    return ClipLoss(local_loss=config.local_loss, gather_with_grad=config.gather_with_grad, cache_labels=True,
                    rank=ctx.rank, world_size=ctx.size, dist_impl=config.loss_dist_impl or "gather")


@dataclass
class TrainData:
    """The training batches and what evaluation needs to read images and captions like them."""

    batches: TrainBatches
    eval_transform: Callable
    tokenizer: Callable
    embedded_root: Path | None  # the embedded shapes set's folder, when the run trains on it


def build_train_data(config: TrainConfig, ctx: World, image_size: int, context_length: int) -> TrainData:
    import fastclip

    tokenizer = functools.partial(fastclip.tokenize, context_length=context_length, truncate=True)
    eval_transform, train_transform = image_transforms(config, image_size)
    augment = not (config.no_augment or config.embedded)
    train_transform = train_transform if augment else eval_transform
    embedded_root = None
    csv_path, img_key, caption_key, separator = (config.train_data, config.csv_img_key, config.csv_caption_key,
                                                 config.csv_separator)
    if config.embedded:
        embedded_root = prepare_embedded_set(config, ctx, image_size)
        csv_path, img_key, caption_key, separator = str(embedded_root / "train.csv"), "filepath", "title", "\t"
    if config.dataset_type == "csv":
        from fastclip.data.csv_dataset import CsvDataset

        dataset = CsvDataset(csv_path, train_transform, tokenizer, img_key=img_key, caption_key=caption_key,
                             separator=separator, seed=config.seed, seed_augmentation=augment)
    elif config.dataset_type == "synthetic":
        from fastclip.data.synthetic import SyntheticShapesDataset

        dataset = SyntheticShapesDataset(config.train_num_samples, train_transform, tokenizer,
                                         image_size=image_size, seed=config.seed)
    else:
        from fastclip.data.webdataset_dataset import WebDatasetPairs

        from fastclip.train.config import upsampling_weights

        weights = (upsampling_weights(config.train_data_upsampling_factors, config.train_data)
                   if config.train_data_upsampling_factors else None)
        dataset = WebDatasetPairs(config.train_data, train_transform, tokenizer, rank=ctx.rank,
                                  world_size=ctx.size, seed=config.seed, resampled=config.dataset_resampled,
                                  source_weights=weights)
    batches = TrainBatches(dataset, config.batch_size, rank=ctx.rank, world_size=ctx.size, seed=config.seed,
                           workers=config.workers, pin_memory=ctx.device.type == "cuda",
                           num_samples=config.train_num_samples if config.dataset_type == "webdataset" else None)
    return TrainData(batches, eval_transform, tokenizer, embedded_root)


def image_transforms(config: TrainConfig, image_size: int) -> tuple[Callable, Callable]:
    """(eval, train) transforms with open_clip's --image-mean/--image-std/--image-interpolation/
    --image-resize-mode/--aug-cfg (interpolation and resize mode act on evaluation, as in open_clip)."""
    import fastclip
    from fastclip.train.config import augmentation_options

    common = dict(mean=config.image_mean, std=config.image_std)
    evaluation = fastclip.image_transform(image_size, train=False, interpolation=config.image_interpolation,
                                          resize_mode=config.image_resize_mode, **common)
    training = fastclip.image_transform(image_size, train=True, **augmentation_options(config.aug_cfg), **common)
    return evaluation, training


def prepare_embedded_set(config: TrainConfig, ctx: World, image_size: int) -> Path:
    """Generate the embedded shapes set once (main rank; the others wait), return its folder."""
    from fastclip.data.shapes import ShapesConfig, ensure_shapes_dataset

    shapes_config = ShapesConfig(image_size=image_size)
    if config.embedded_train_size:
        shapes_config = dataclasses.replace(shapes_config, train_size=config.embedded_train_size)
    if config.embedded_val_size:
        val = config.embedded_val_size
        shapes_config = dataclasses.replace(shapes_config, val_seen_size=val, val_unseen_size=max(64, val // 2),
                                            val_shifted_size=val)
    root = None
    if ctx.is_main:
        root = ensure_shapes_dataset(shapes_config, config.cache_dir, log=lambda message: say(ctx, message))
    barrier(ctx)
    return ensure_shapes_dataset(shapes_config, config.cache_dir) if root is None else root


def build_parts(config: TrainConfig, ctx: World, model: torch.nn.Module,
                lineage: dict[str, object]) -> tuple[TrainParts, str]:
    """Wrap ``model`` (DDP when distributed, sharded in place with ``--fsdp``), build loss, optimiser and scaler.
    Returns (parts, optimiser name).

    ``parts.schedule`` stays None until the total step count is known (after a resume).
    """
    from fastclip.train.fsdp import checkpoint_layout, shard_model

    ddp_model = model
    if config.use_bn_sync and ctx.device.type == "cpu":
        raise ValueError("--use-bn-sync: SyncBatchNorm runs on GPUs only; drop it for a CPU run")
    if config.fsdp and ctx.distributed:
        ddp_model = model = shard_model(model, config)  # before the optimiser: it holds the sharded parameters
    elif config.fsdp:
        say(ctx, "--fsdp on one process: there is nothing to shard, so this run trains unsharded (the "
                 f"--fsdp-checkpoint {checkpoint_layout(config)} layout is still written)")
    elif ctx.distributed:
        if config.use_bn_sync:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            **({"static_graph": True} if config.ddp_static_graph else {}))
    optimizer, optimizer_name = build_optimizer(model, lr=config.lr, weight_decay=config.wd,
                                                betas=(config.beta1, config.beta2), eps=config.eps)
    loss_fn = build_loss(config, ctx, model)
    if config.torchcompile:
        from fastclip.train.compile import compile_model_and_loss

        ddp_model, loss_fn = compile_model_and_loss(ddp_model, loss_fn, distributed=ctx.distributed)
    parts = TrainParts(model=ddp_model, unwrapped=model, loss_fn=loss_fn, optimizer=optimizer,
                       schedule=None, scaler=make_grad_scaler(config.precision, ctx.device),
                       logit_scale=find_parameter(model, "logit_scale"), ctx=ctx, precision=config.precision,
                       accum_freq=config.accum_freq, grad_clip_norm=config.grad_clip_norm,
                       max_nonfinite_steps=config.max_nonfinite_steps, ranges=NvtxRanges(enabled=True),
                       trainable=[p for p in model.parameters() if p.requires_grad], lineage=lineage,
                       checkpoint_layout=checkpoint_layout(config))
    return parts, optimizer_name
