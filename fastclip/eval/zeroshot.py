"""Zero-shot classification with prompt ensembling (CLIP paper, section 3.1.4).

Each class's prompts ("a photo of a {}." ...) are encoded, L2-normalised, averaged over templates and
renormalised: the class embedding. Images are classified by cosine similarity to the class embeddings.
Plain PyTorch::

    weights = F.normalize(torch.stack([F.normalize(encode_text(prompts(c)), dim=-1).mean(0) for c in classes]), dim=-1)
    top1 = ((image_features @ weights.T).argmax(-1) == labels).float().mean()
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fastclip.eval.features import encode_texts


def build_zero_shot_classifier(model: torch.nn.Module, classnames: Sequence[str], templates: Sequence[str],
                               tokenizer: Callable, device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """Class embeddings (C, E) float32: per class, the renormalised mean of its normalised prompts."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    prompts = [template.format(name) for name in classnames for template in templates]
    features = encode_texts(model, prompts, tokenizer, device, precision)  # (C * T, E), normalised
    per_class = features.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict:
    """Fraction of rows whose label is among the k highest logits: {"top1": ..., "top5": ...}.

    logits: (N, C); labels: (N,) int64. k larger than C counts as C.
    """
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {labels.shape[0]} labels")
    ranked = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in topk}


def zero_shot_accuracy(image_features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor,
                       topk: Sequence[int] = (1, 5)) -> dict:
    """image_features: (N, E) normalised; classifier: (C, E); labels: (N,) -> {"top1", "top5"}."""
    return topk_accuracy(image_features @ classifier.T, labels, topk)


def evaluate_image_folder(model: torch.nn.Module, root, *, classnames: Sequence[str] | None = None,
                          templates: Sequence[str], transform: Callable, tokenizer: Callable, device: torch.device,
                          precision: str = "fp32", batch_size: int = 256, workers: int = 0) -> dict:
    """Zero-shot top-1/top-5 on a class-per-folder image directory (``fastclip.data.image_folder``).

    ``classnames``: one per class folder in sorted order (default: the folder names). Returns
    ``{"top1", "top5", "images", "classes", "templates"}``.
    """
    from fastclip.data.image_folder import ImageFolderDataset, read_classnames
    from fastclip.eval.features import encode_images

    dataset = ImageFolderDataset(root, transform)
    names = list(classnames) if classnames is not None else read_classnames(None, dataset.classes)
    if len(names) != len(dataset.classes):
        raise ValueError(f"{len(names)} class names for the {len(dataset.classes)} class folders of {root}")
    classifier = build_zero_shot_classifier(model, names, templates, tokenizer, device, precision)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    features = encode_images(model, loader, device, precision)
    results = zero_shot_accuracy(features, classifier, torch.tensor(dataset.labels))
    results.update(images=len(dataset), classes=len(names), templates=len(templates))
    return results


def format_folder_result(root, results: dict) -> str:
    """One line: ``zero-shot on ROOT: top-1 x%, top-5 y% (N images, C classes, T templates)``."""
    return (f"zero-shot on {root}: top-1 {100 * results['top1']:.1f}%, top-5 {100 * results['top5']:.1f}% "
            f"({counted(results['images'], 'image')}, {counted(results['classes'], 'class')}, "
            f"{counted(results['templates'], 'template')})")


def counted(number: int, noun: str) -> str:
    """``1 template``, ``80 templates``, ``1 class``, ``3 classes``."""
    plural = noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")
    return f"{number} {noun if number == 1 else plural}"
