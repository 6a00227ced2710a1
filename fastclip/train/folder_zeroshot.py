"""``--imagenet-val DIR``: zero-shot top-1/top-5 on a class-per-folder image directory during training.

open_clip's flag, for any folder in the ImageNet-val layout (``DIR/<class folder>/*.jpg``), with the class
names from ``--classnames`` (see :func:`fastclip.data.image_folder.read_classnames`) and the prompts of
``--zeroshot-templates``. Runs on the main rank; the others wait at a barrier.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastclip.train.process_group import barrier

PREFIX = "imagenet-val"  # the metric names: imagenet-val/top1, imagenet-val/top5, ...


def check_folder_options(config) -> None:
    """Refuse a bad folder, class-names file or template set before anything is trained."""
    if config.classnames and not config.imagenet_val:
        raise ValueError("--classnames names the classes of --imagenet-val DIR; add --imagenet-val or drop it")
    if config.imagenet_val:
        from fastclip.data.image_folder import class_folders, read_classnames
        from fastclip.eval.templates import load_templates

        read_classnames(config.classnames, class_folders(config.imagenet_val))
        load_templates(config.zeroshot_templates)


def evaluate_folder(config, ctx, model: torch.nn.Module, transform: Callable, tokenizer: Callable,
                    announce: Callable[[str], None]) -> dict:
    """``{"imagenet-val/top1", "imagenet-val/top5", "imagenet-val/images", ...}`` on the main rank, {} elsewhere;
    ``announce`` gets the one-line result."""
    results = {}
    if ctx.is_main:
        from fastclip.data.image_folder import class_folders, read_classnames
        from fastclip.eval.templates import load_templates
        from fastclip.eval.zeroshot import evaluate_image_folder, format_folder_result

        found = evaluate_image_folder(model, config.imagenet_val,
                                      classnames=read_classnames(config.classnames, class_folders(config.imagenet_val)),
                                      templates=load_templates(config.zeroshot_templates), transform=transform,
                                      tokenizer=tokenizer, device=ctx.device, precision=config.precision,
                                      workers=min(config.workers, 2))
        announce(format_folder_result(config.imagenet_val, found))
        results = {f"{PREFIX}/{key}": value for key, value in found.items()}
        model.train()
    barrier(ctx)
    return results
