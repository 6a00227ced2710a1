"""open_clip's CSV dataset: one row per image, an image-path column and a caption column."""
from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from fastclip.data.image_io import first_readable, load_rgb_image

logger = logging.getLogger("fastclip.data")


def read_csv_rows(path: str | Path, separator: str = "\t") -> list[tuple[int, dict[str, str]]]:
    """All rows of a CSV/TSV file as ``(line number, dict)`` (header line = column names).

    A file that is not UTF-8 text or not valid CSV is a ValueError naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--train-data/--val-data file {str(path)!r} does not exist")
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=separator)
        try:
            for row in reader:
                rows.append((reader.line_num, row))
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text after line {reader.line_num} ({error.reason} at byte "
                             f"{error.start} of a block); is it a CSV file?") from None
        except csv.Error as error:
            raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({error})") from None
    return rows


def _is_blank(value) -> bool:
    """A field that a short row left out (None) or that holds only whitespace."""
    return value is None or not str(value).strip()


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


def _check_some_images_exist(image_paths: list[str], csv_path, root: Path, probe: int = 32) -> None:
    """Refuse a CSV whose first ``probe`` image paths all point nowhere (a wrong column or base folder)."""
    if not any(os.path.exists(path) for path in image_paths[:probe]):
        raise ValueError(f"{csv_path}: none of the first {min(probe, len(image_paths))} image paths exists "
                         f"(e.g. {image_paths[0]}); relative paths are resolved against the CSV's folder {root}. "
                         "Check --csv-img-key and where the images are")


class CsvDataset(Dataset):
    """Image-caption pairs listed in a CSV, decoded lazily (works in DataLoader workers).

    ``dataset[i]`` returns ``(image, tokens, skipped)``: image (3, H, W) float from ``transform``,
    tokens (context_length,) int64 from ``tokenizer``, and ``skipped`` = how many unreadable images were
    passed over to produce this sample (see :func:`first_readable`). Relative image paths are resolved
    against the CSV's folder. Rows whose image path or caption is empty or absent (a short or truncated
    line) are left out at load time, logged, and their line numbers kept in ``skipped_rows``. With
    ``seed_augmentation=True`` random augmentations draw from a generator seeded by (seed, epoch, index),
    so a resumed run sees the same pixels as an uninterrupted one.
    """

    def __init__(self, csv_path: str | Path, transform: Callable, tokenizer: Callable, *,
                 img_key: str = "filepath", caption_key: str = "title", separator: str = "\t",
                 seed: int = 0, seed_augmentation: bool = False):
        numbered = read_csv_rows(csv_path, separator)
        if not numbered:
            raise ValueError(f"{csv_path} has no rows (an empty file, or a header only)")
        columns = list(numbered[0][1])
        missing = [key for key in (img_key, caption_key) if key not in columns]
        if missing:
            raise ValueError(f"{csv_path} has no column(s) {missing}; its columns are {columns}. "
                             "Set --csv-img-key / --csv-caption-key (and --csv-separator, default tab)")
        def usable(row: dict) -> bool:
            return not (_is_blank(row[img_key]) or _is_blank(row[caption_key]))

        #: line numbers of the rows left out because their image path or caption is empty or absent
        self.skipped_rows = [line for line, row in numbered if not usable(row)]
        rows = [row for _, row in numbered if usable(row)]
        if self.skipped_rows:
            logger.warning("%s: skipped %d row(s) without an image path or a caption (line(s) %s)", csv_path,
                           len(self.skipped_rows), ", ".join(map(str, self.skipped_rows[:10]))
                           + (", ..." if len(self.skipped_rows) > 10 else ""))
        if not rows:
            raise ValueError(f"{csv_path}: every row lacks an image path ({img_key!r}) or a caption "
                             f"({caption_key!r}); check --csv-img-key / --csv-caption-key / --csv-separator")
        self.source = str(csv_path)
        root = Path(csv_path).resolve().parent
        self.image_paths = [str(root / row[img_key]) for row in rows]
        _check_some_images_exist(self.image_paths, csv_path, root)
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
        image, index, skipped = first_readable(index, len(self), self._load,
                                               describe=lambda i: f"{self.image_paths[i]} (listed in {self.source})")
        if self.seed_augmentation:
            pixels = seeded_transform(self.transform, image, self.seed, self.epoch, index)
        else:
            pixels = self.transform(image)
        return pixels, self.tokenizer([self.captions[index]])[0], skipped
