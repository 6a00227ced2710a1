"""open_clip's CSV dataset: one row per image, an image-path column and a caption column."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from fastclip.data.image_io import first_readable, load_rgb_image


def read_csv_rows(path: str | Path, separator: str = "\t") -> list[dict[str, str]]:
    """All rows of a CSV/TSV file as dicts (header line = column names)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--train-data/--val-data file {str(path)!r} does not exist")
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter=separator))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed that depends only on (seed, epoch, index): augmentations replay exactly on resume."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def seeded_transform(transform: Callable, image, seed: int, epoch: int, index: int):
    """``transform(image)`` with torch's RNG seeded from (seed, epoch, index), the caller's RNG untouched.

    A worker's RNG stream otherwise depends on which samples it drew before, which differs between
    an uninterrupted epoch and one resumed in the middle.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(seed, epoch, index))
        return transform(image)


class CsvDataset(Dataset):
    """Image-caption pairs listed in a CSV, decoded lazily (works in DataLoader workers).

    ``dataset[i]`` returns ``(image, tokens, skipped)``: image (3, H, W) float from ``transform``,
    tokens (context_length,) int64 from ``tokenizer``, and ``skipped`` = how many unreadable images were
    passed over to produce this sample (see :func:`first_readable`). Relative image paths are resolved
    against the CSV's folder. With ``seed_augmentation=True`` random augmentations draw from a generator
    seeded by (seed, epoch, index), so a resumed run sees the same pixels as an uninterrupted one.
    """

    def __init__(self, csv_path: str | Path, transform: Callable, tokenizer: Callable, *,
                 img_key: str = "filepath", caption_key: str = "title", separator: str = "\t",
                 seed: int = 0, seed_augmentation: bool = False):
        rows = read_csv_rows(csv_path, separator)
        if not rows:
            raise ValueError(f"{csv_path} has no rows")
        missing = [key for key in (img_key, caption_key) if key not in rows[0]]
        if missing:
            raise ValueError(f"{csv_path} has no column(s) {missing}; its columns are {list(rows[0])}. "
                             "Set --csv-img-key / --csv-caption-key (and --csv-separator, default tab)")
        root = Path(csv_path).resolve().parent
        self.image_paths = [str(root / row[img_key]) for row in rows]
        self.captions = [row[caption_key] for row in rows]
        self.rows = rows
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = seed
        self.seed_augmentation = seed_augmentation
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.image_paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, index: int):
        return load_rgb_image(self.image_paths[index])

    def __getitem__(self, index: int):
        image, index, skipped = first_readable(index, len(self), self._load)
        if self.seed_augmentation:
            pixels = seeded_transform(self.transform, image, self.seed, self.epoch, index)
        else:
            pixels = self.transform(image)
        return pixels, self.tokenizer([self.captions[index]])[0], skipped
