"""Class-per-folder image sets (ImageNet-val layout: ``ROOT/<class folder>/<image>``) and their class names.

The folders sorted by name give the labels 0..C-1 (torchvision's ``ImageFolder`` order, which this
wraps). Class names come from a file (:func:`read_classnames`) or, without one, from the folder names
with underscores turned into spaces.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from fastclip.data.image_io import UnreadableDataError, load_rgb_image

#: Image file endings that count (torchvision's list)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def class_folders(root: str | Path) -> list[str]:
    """The class folder names under ``root``, sorted; a ValueError when ``root`` is not such a folder."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is not a folder; give a class-per-folder image directory "
                         "(ROOT/<class>/<image>.jpg, the ImageNet-val layout)")
    folders = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} holds no class folders; the layout is ROOT/<class>/<image>.jpg (ImageNet val "
                         "as sorted by valprep.sh)")
    return folders


def _read_strict(path: str) -> "object":
    image = load_rgb_image(path)
    if image is None:
        raise UnreadableDataError(f"cannot read image {path}; remove or replace the file")
    return image


class ImageFolderDataset:
    """``dataset[i] -> (transform(image), label)``; an unreadable image is an UnreadableDataError naming it
    (an evaluation must not silently change its denominator)."""

    def __init__(self, root: str | Path, transform: Callable):
        from torchvision.datasets import ImageFolder

        self.root = Path(root)
        self.classes = class_folders(root)
        try:
            self._folder = ImageFolder(str(root), transform=transform, loader=_read_strict,
                                       is_valid_file=lambda path: path.lower().endswith(IMAGE_EXTENSIONS),
                                       allow_empty=True)
        except (FileNotFoundError, OSError) as error:
            raise ValueError(f"{root}: {error}") from None
        if not self._folder.samples:
            raise ValueError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        self.labels = list(self._folder.targets)

    def __len__(self) -> int:
        return len(self._folder)

    def __getitem__(self, index: int):
        return self._folder[index]


def read_classnames(path: str | Path | None, folders: list[str]) -> list[str]:
    """Class names in label order for the sorted ``folders``.

    ``path`` is either a JSON file, a map ``{"<folder>": "<name>"}`` that covers every folder (extra keys are
    ignored) or a list of names in sorted-folder order, or a text file with one name per line in that order.
    ``None``: the folder names, underscores as spaces.
    """
    if path is None:
        return [folder.replace("_", " ") for folder in folders]
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"class-names file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if isinstance(names, dict):
            missing = [folder for folder in folders if folder not in names]
            if missing:
                raise ValueError(f"{path} names no class for the folder(s) {missing[:5]} "
                                 f"({len(missing)} of {len(folders)}); it maps folder name -> class name")
            return [str(names[folder]) for folder in folders]
        if not isinstance(names, list):
            raise ValueError(f"{path}: expected a JSON object (folder -> name) or a list of names")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != len(folders):
        raise ValueError(f"{path} lists {len(names)} class names but the image folder has {len(folders)} class "
                         "folders; list one name per folder, in sorted folder order (or a JSON folder -> name map)")
    return [str(name) for name in names]
