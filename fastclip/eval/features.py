"""Frozen-model features for evaluation: images from a loader, texts in batches, the images of a CSV."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from fastclip.data.collate import collate_pairs, trim_padding
from fastclip.data.csv_dataset import CsvDataset
from fastclip.precision import autocast


@torch.no_grad()
def encode_images(model: torch.nn.Module, batches: Iterable, device: torch.device, precision: str = "fp32"):
    """L2-normalised image features (N, E) float32 on CPU, for every ``(images, ...)`` batch."""
    model.eval()
    features = []
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        with autocast(precision, device):
            encoded = model.encode_image(images.to(device), normalize=True)
        features.append(encoded.float().cpu())
    return torch.cat(features)


@torch.no_grad()
def encode_texts(model: torch.nn.Module, texts: Sequence[str], tokenizer: Callable, device: torch.device,
                 precision: str = "fp32", batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text features (N, E) float32 on CPU."""
    model.eval()
    features = []
    for start in range(0, len(texts), batch_size):
        tokens = trim_padding(tokenizer(list(texts[start:start + batch_size])))
        with autocast(precision, device):
            encoded = model.encode_text(tokens.to(device), normalize=True)
        features.append(encoded.float().cpu())
    return torch.cat(features)


def encode_csv_images(model: torch.nn.Module, csv_path: str | Path, *, transform: Callable, tokenizer: Callable,
                      device: torch.device, precision: str = "fp32", img_key: str = "filepath",
                      caption_key: str = "title", separator: str = "\t", batch_size: int = 256,
                      workers: int = 0, limit: int | None = None) -> tuple[CsvDataset, torch.Tensor]:
    """The image-caption pairs of a CSV (open_clip's columns) and their image features (N, E) -> (dataset, features).

    ``limit``: only the first ``limit`` pairs (``--val-num-samples``)."""
    dataset = CsvDataset(csv_path, transform, tokenizer, img_key=img_key, caption_key=caption_key,
                         separator=separator)
    if limit is not None:
        dataset.image_paths, dataset.captions, dataset.rows = (dataset.image_paths[:limit], dataset.captions[:limit],
                                                                dataset.rows[:limit])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_pairs)
    return dataset, encode_images(model, loader, device, precision)
