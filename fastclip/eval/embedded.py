"""Evaluation of a model on the embedded shapes set: the table ``fastclip train`` prints at the end.

Zero-shot top-1/top-5 over the 64 colour-shape classes on three held-out splits (seen combinations,
unseen combinations, textured backgrounds), single prompt vs prompt ensemble, with chance level; on
unseen combinations also how often the predicted colour and shape are right on their own; and
image<->text retrieval recall@1/5/10 on the seen split (``retrieval.caption_retrieval``: the same numbers
as ``fastclip eval --task retrieval`` on that split).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from fastclip.data import shapes
from fastclip.data.csv_dataset import CsvDataset
from fastclip.data.collate import collate_pairs
from fastclip.eval.features import encode_images
from fastclip.eval.retrieval import MATCH_RULE, caption_retrieval
from fastclip.eval.templates import SHAPES_TEMPLATES
from fastclip.eval.zeroshot import build_zero_shot_classifier, zero_shot_accuracy

SPLIT_TITLES = {"val_seen": "seen combinations", "val_unseen": "unseen combinations",
                "val_shifted": "shifted (textured bg)"}


def _attribute_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> dict:
    """How often the predicted class has the right colour / the right shape (label = colour * 8 + shape)."""
    count = len(shapes.SHAPES)
    return {"colour_top1": (predicted // count == labels // count).float().mean().item(),
            "shape_top1": (predicted % count == labels % count).float().mean().item()}


def evaluate_embedded(model: torch.nn.Module, root: str | Path, *, transform: Callable, tokenizer: Callable,
                      device: torch.device, precision: str = "fp32", batch_size: int = 256,
                      workers: int = 0) -> dict:
    """All metrics of the report as a flat dict of fractions (see module docstring)."""
    root = Path(root)
    names = shapes.class_names()
    classifiers = {
        "single": build_zero_shot_classifier(model, names, SHAPES_TEMPLATES[:1], tokenizer, device, precision),
        "ensemble": build_zero_shot_classifier(model, names, SHAPES_TEMPLATES, tokenizer, device, precision),
    }
    results: dict = {"num_classes": len(names), "chance_top1": 1 / len(names), "chance_top5": 5 / len(names)}
    for split in SPLIT_TITLES:
        dataset = CsvDataset(root / f"{split}.csv", transform, tokenizer)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                             collate_fn=collate_pairs)
        features = encode_images(model, loader, device, precision)
        labels = torch.tensor([int(row["label"]) for row in dataset.rows])
        results[f"{split}/images"] = len(dataset)
        for kind, classifier in classifiers.items():
            for metric, value in zero_shot_accuracy(features, classifier, labels).items():
                results[f"{split}/{kind}_{metric}"] = value
        predicted = (features @ classifiers["ensemble"].T).argmax(dim=1)
        for metric, value in _attribute_accuracy(predicted, labels).items():
            results[f"{split}/{metric}"] = value
        if split == "val_seen":
            recalls = caption_retrieval(model, features, dataset.captions, tokenizer=tokenizer, device=device,
                                        precision=precision)
            for metric, value in recalls.items():
                results[f"{split}/{metric}"] = value
    return results


def format_report(results: dict) -> str:
    """The printed table (percentages)."""
    pct = lambda value: f"{100 * value:5.1f}%"  # noqa: E731
    lines = [
        f"zero-shot classification, {results['num_classes']} colour-shape classes "
        f"(chance: top-1 {pct(results['chance_top1']).strip()}, top-5 {pct(results['chance_top5']).strip()})",
        f"{'held-out split':<24}{'images':>7}{'1 prompt':>10}{'ensemble':>10}{'top-5':>8}"
        f"{'colour':>8}{'shape':>8}",
    ]
    for split, title in SPLIT_TITLES.items():
        lines.append(f"{title:<24}{results[f'{split}/images']:>7}{pct(results[f'{split}/single_top1']):>10}"
                     f"{pct(results[f'{split}/ensemble_top1']):>10}{pct(results[f'{split}/ensemble_top5']):>8}"
                     f"{pct(results[f'{split}/colour_top1']):>8}{pct(results[f'{split}/shape_top1']):>8}")
    lines.append("(1 prompt / ensemble = top-1 with 'a photo of a {}.' / with "
                 f"{len(SHAPES_TEMPLATES)} averaged templates; colour, shape = top-1 of that attribute alone)")
    lines.append("")
    lines.append(f"retrieval on the seen split ({results['val_seen/images']} pairs){'R@1':>9}{'R@5':>8}{'R@10':>8}")
    for direction, title in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        values = "".join(f"{pct(results[f'val_seen/{direction}_R@{k}']):>8}" for k in (1, 5, 10))
        lines.append(f"{title:<40}{values}")
    lines.append(f"({MATCH_RULE}, as fastclip eval --task retrieval counts)")
    return "\n".join(lines)
