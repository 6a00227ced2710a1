"""The embedded procedural image-caption set: coloured shapes on backgrounds, written as PNG + CSV.

Each image shows one shape. Its **class** is the (colour, shape) combination, e.g. "red star": 8 shapes x
8 colours = 64 classes. Size, position, background, a colour jitter and pixel noise are nuisance
attributes (the captions describe the first three) that the class ignores, so the model has to learn
*which words go with which pixels*, as CLIP does on the web.

Splits (one CSV each, open_clip's layout: tab-separated ``filepath`` and ``title`` columns plus attribute
columns that evaluation uses):

- ``train``: the 56 seen combinations on plain backgrounds (black / white / gray).
- ``val_seen``: new images of the seen combinations, same distribution as train.
- ``val_unseen``: the 8 held-out combinations, never shown in training. Each shape and each colour
  still appears in training with 7 other partners, so a model that composes words can name them.
- ``val_shifted``: seen combinations on textured backgrounds (stripes, checkerboard, noise) that never
  appear in training: a distribution shift, as the CLIP paper's robustness tables report.

Why 64 colour-shape classes: colour alone is trivial and shape alone (8 classes) gives a weak
zero-shot test of text; 64 combinations give a chance level of 1/64 and a compositional held-out split.
Colour is learnt within ~50 steps; shape is the hard part (measured: a small ViT stays at chance on
shape for 400 steps, a small ResNet reaches ~80 % in 400 steps at 32 px), which is why the default
run trains ``RN-Tiny`` at 32 px and why the shapes fill a good part of the image.
"""
from __future__ import annotations

import csv
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "crescent", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 35),
    "green": (40, 165, 60),
    "cyan": (40, 200, 215),
    "blue": (40, 70, 225),
    "purple": (135, 50, 190),
    "pink": (245, 125, 195),
}
PLAIN_BACKGROUNDS = {"black": (12, 12, 12), "white": (242, 242, 242), "gray": (128, 128, 128)}
SHIFTED_BACKGROUNDS = ("striped", "checkered", "noisy")
# radius as a fraction of the image side: large enough that 8 shapes stay distinct at 32 px
SIZES = {"small": (0.20, 0.25), "large": (0.30, 0.38)}
POSITIONS = {  # centre region (x0, x1, y0, y1) as fractions of the side
    "top left": (0.0, 0.45, 0.0, 0.45),
    "top right": (0.55, 1.0, 0.0, 0.45),
    "bottom left": (0.0, 0.45, 0.55, 1.0),
    "bottom right": (0.55, 1.0, 0.55, 1.0),
    "center": (0.4, 0.6, 0.4, 0.6),
}
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} on a {background} background",
    "a {colour} {shape} in the {position}",
    "a photo of a {colour} {shape}",
    "{size} {colour} {shape}, {position}, {background} background",
    "there is a {colour} {shape} at the {position} of the picture",
    "a {shape} that is {colour}",
    "the {shape} is {colour} and {size}",
    "a {background} picture with a {size} {colour} {shape}",
    "a {colour} {shape}",
    "the {colour} {shape} sits in the {position}",
)
CSV_FIELDS = ("filepath", "title", "label", "colour", "shape", "size", "position", "background")
SPLITS = ("train", "val_seen", "val_unseen", "val_shifted")
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges


def class_names() -> list[str]:
    """The 64 zero-shot class names, label = colour_index * len(SHAPES) + shape_index."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def held_out_combinations() -> set[tuple[str, str]]:
    """8 (colour, shape) pairs never shown in training: one per shape and one per colour (a Latin diagonal)."""
    colours = list(COLOURS)
    return {(colours[(3 * index + 1) % len(colours)], shape) for index, shape in enumerate(SHAPES)}


@dataclass(frozen=True)
class ShapesConfig:
    """Sizes of the generated splits; ``version`` is part of the cache key."""

    image_size: int = 32
    train_size: int = 16000
    val_seen_size: int = 1024
    val_unseen_size: int = 512
    val_shifted_size: int = 1024
    seed: int = 0
    version: int = 2

    def cache_name(self) -> str:
        return (f"shapes-v{self.version}-s{self.image_size}-n{self.train_size}-{self.val_seen_size}-"
                f"{self.val_unseen_size}-{self.val_shifted_size}-seed{self.seed}")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "val_seen": self.val_seen_size,
                "val_unseen": self.val_unseen_size, "val_shifted": self.val_shifted_size}


def _polygon(points: np.ndarray, cx: float, cy: float, radius: float, angle: float) -> list[tuple]:
    """Scale unit-radius ``points`` (N, 2) by ``radius``, rotate by ``angle`` and move to the centre."""
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = points @ rotation.T * radius + np.array([cx, cy])
    return [tuple(point) for point in moved]


def _regular(count: int, start: float = -math.pi / 2) -> np.ndarray:
    angles = start + np.arange(count) * 2 * math.pi / count
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star_points() -> np.ndarray:
    angles = -math.pi / 2 + np.arange(10) * math.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)


def _cross_points(arm: float = 0.36) -> np.ndarray:
    a, b = arm, 1.0
    return np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                     (-b, a), (-b, -a), (-a, -a)])


def _heart_points() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 60, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], axis=1) / 17.0


_UNIT_POLYGONS = {"square": _regular(4, math.pi / 4), "triangle": _regular(3), "star": _star_points(),
                  "cross": _cross_points(), "heart": _heart_points()}


def draw_shape_mask(shape: str, size_px: int, cx: float, cy: float, radius: float, angle: float):
    """An anti-aliased coverage mask (PIL "L", ``size_px`` x ``size_px``) of one shape."""
    from PIL import Image, ImageDraw

    scale = SUPERSAMPLE
    canvas = Image.new("L", (size_px * scale, size_px * scale), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, radius = cx * scale, cy * scale, radius * scale

    def disc(x, y, r, fill):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    if shape == "circle":
        disc(cx, cy, radius, 255)
    elif shape == "ring":
        disc(cx, cy, radius, 255)
        disc(cx, cy, radius * 0.55, 0)
    elif shape == "crescent":
        disc(cx, cy, radius, 255)
        disc(cx + radius * 0.45 * math.cos(angle), cy - radius * 0.45 + radius * 0.2 * math.sin(angle),
             radius * 0.85, 0)
    elif shape in _UNIT_POLYGONS:
        draw.polygon(_polygon(_UNIT_POLYGONS[shape], cx, cy, radius, angle), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return canvas.resize((size_px, size_px), Image.BOX)


def _background(kind: str, size_px: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 background: plain colours for training, textures for the shifted split."""
    if kind in PLAIN_BACKGROUNDS:
        return np.broadcast_to(np.array(PLAIN_BACKGROUNDS[kind], np.float32), (size_px, size_px, 3)).copy()
    low, high = sorted(rng.uniform(20, 235, size=2))
    ys, xs = np.mgrid[0:size_px, 0:size_px]
    if kind == "striped":
        period, angle = rng.uniform(6, 14), rng.uniform(0, math.pi)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        gray = np.where(np.floor(phase) % 2 == 0, low, high)
    elif kind == "checkered":
        cell = int(rng.integers(5, 12))
        gray = np.where((xs // cell + ys // cell) % 2 == 0, low, high)
    elif kind == "noisy":
        coarse = rng.uniform(low, high, size=(size_px // 8 + 1, size_px // 8 + 1))
        gray = np.kron(coarse, np.ones((8, 8)))[:size_px, :size_px] + rng.normal(0, 20, (size_px, size_px))
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.repeat(gray[..., None], 3, axis=2).astype(np.float32)


def render_example(rng: np.random.Generator, size_px: int, colour: str, shape: str, background: str):
    """Draw one image. Returns (uint8 array (size, size, 3), attribute dict with size and position)."""
    size_name = str(rng.choice(list(SIZES)))
    position = str(rng.choice(list(POSITIONS)))
    radius = rng.uniform(*SIZES[size_name]) * size_px
    x0, x1, y0, y1 = POSITIONS[position]
    margin = radius + 1.5
    low_x, high_x = max(margin, x0 * size_px), min(size_px - margin, x1 * size_px)
    low_y, high_y = max(margin, y0 * size_px), min(size_px - margin, y1 * size_px)
    cx = rng.uniform(low_x, max(low_x, high_x))
    cy = rng.uniform(low_y, max(low_y, high_y))
    angle = 0.0  # upright: a rotated square reads as a diamond at 32 px
    mask = np.asarray(draw_shape_mask(shape, size_px, cx, cy, radius, angle), np.float32)[..., None] / 255.0
    tint = np.clip(np.array(COLOURS[colour], np.float32) + rng.uniform(-18, 18, size=3), 0, 255)
    pixels = _background(background, size_px, rng) * (1 - mask) + tint * mask
    pixels += rng.normal(0, 4.0, pixels.shape)
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    return image, {"size": size_name, "position": position}


def make_caption(rng: random.Random, attributes: dict) -> str:
    """One caption from a random template; the background of shifted images is called by its texture."""
    return rng.choice(CAPTION_TEMPLATES).format(**attributes)


def _split_examples(config: ShapesConfig, split: str) -> Iterator[tuple[str, str, str]]:
    """Yield (colour, shape, background) for each image of ``split``, balanced over its combinations."""
    held_out = held_out_combinations()
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    combos = [combo for combo in combos if (combo in held_out) == (split == "val_unseen")]
    backgrounds = SHIFTED_BACKGROUNDS if split == "val_shifted" else tuple(PLAIN_BACKGROUNDS)
    count = config.split_sizes()[split]
    order = random.Random(f"{config.seed}-{split}-order")
    for index in range(count):
        colour, shape = combos[index % len(combos)]
        yield colour, shape, backgrounds[order.randrange(len(backgrounds))]


def _write_split(config: ShapesConfig, root: Path, split: str) -> None:
    from PIL import Image

    split_seed = SPLITS.index(split) + 1
    rng = np.random.default_rng([config.seed, split_seed])
    caption_rng = random.Random(config.seed * 1000 + split_seed)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    names = class_names()
    for index, (colour, shape, background) in enumerate(_split_examples(config, split)):
        pixels, attributes = render_example(rng, config.image_size, colour, shape, background)
        relative = f"{split}/{index:06d}.png"
        Image.fromarray(pixels).save(root / relative, format="PNG", compress_level=1)
        attributes.update(colour=colour, shape=shape, background=background)
        rows.append({"filepath": relative, "title": make_caption(caption_rng, attributes),
                     "label": names.index(f"{colour} {shape}"), **attributes})
    order = random.Random(f"{config.seed}-{split}-shuffle")
    order.shuffle(rows)
    with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)  # inside atomic_dir's staging folder, fsync'ed with it


def default_cache_dir() -> Path:
    """``$FASTCLIP_CACHE`` if set, else ``$XDG_CACHE_HOME/fastclip`` (``~/.cache/fastclip``)."""
    if os.environ.get("FASTCLIP_CACHE"):
        return Path(os.environ["FASTCLIP_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "fastclip"


def find_cached_shapes_dataset(image_size: int, cache_dir: str | Path | None = None) -> Path | None:
    """The most recently generated complete set of ``image_size`` in the cache (any split sizes), or None."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    prefix = f"shapes-v{ShapesConfig.version}-s{image_size}-"
    found = [path for path in cache_dir.glob(prefix + "*") if (path / "COMPLETE").exists()] if cache_dir.is_dir() else []
    return max(found, key=lambda path: (path / "COMPLETE").stat().st_mtime) if found else None


def ensure_shapes_dataset(config: ShapesConfig = ShapesConfig(), cache_dir: str | Path | None = None,
                          log=print) -> Path:
    """Generate the set once (cached) and return its folder with ``<split>.csv`` files.

    Generation writes into a temporary folder that ``fastclip.io.atomic_dir`` renames into place, under
    a file lock, so a crashed or concurrent run (e.g. several torchrun ranks) never sees a half-written
    set; what a killed generator left is removed by the next one.
    """
    import fcntl
    import re
    import time

    from fastclip.io import atomic_dir, remove_stale_temporaries

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache_dir / config.cache_name()
    if (root / "COMPLETE").exists():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{config.cache_name()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "COMPLETE").exists():
            return root
        remove_stale_temporaries(cache_dir, re.escape(config.cache_name()))  # a killed generator's (we hold the lock)
        start = time.perf_counter()
        total = sum(config.split_sizes().values())
        log(f"generating the embedded shapes set ({total} images, once) in {root}")
        with atomic_dir(root, replace=True) as staging:  # replaces an incomplete folder only once this one is whole
            for split in SPLITS:
                _write_split(config, staging, split)
            (staging / "COMPLETE").write_text(f"{config}\n")
        log(f"generated in {time.perf_counter() - start:.1f} s")
    return root
