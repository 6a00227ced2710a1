"""``--dataset-type synthetic``: the procedural shapes drawn on the fly, in memory, no files.

Sample ``i`` is a pure function of (seed, i), so every worker, rank and resumed run sees the same
pairs. Useful for benchmarks (no disk or PNG decoding in the way) and quick experiments.
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from fastclip.data import shapes
from fastclip.data.csv_dataset import seeded_transform


class SyntheticShapesDataset(Dataset):
    """``num_samples`` shapes of the training distribution (seen combinations, plain backgrounds).

    ``dataset[i]`` returns ``(image, tokens, 0)`` like :class:`~fastclip.data.csv_dataset.CsvDataset`:
    image (3, H, W) float from ``transform`` (applied to a PIL image of ``image_size``), tokens
    (context_length,) int64. Random augmentations draw from a (seed, epoch, index)-seeded generator.
    """

    def __init__(self, num_samples: int, transform: Callable, tokenizer: Callable, *, image_size: int = 64,
                 seed: int = 0, split: str = "train"):
        if num_samples < 1:
            raise ValueError(f"--train-num-samples must be >= 1 for the synthetic dataset, got {num_samples}")
        held_out = shapes.held_out_combinations()
        combos = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
        self.combinations = [combo for combo in combos if (combo in held_out) == (split == "val_unseen")]
        self.backgrounds = (shapes.SHIFTED_BACKGROUNDS if split == "val_shifted"
                            else tuple(shapes.PLAIN_BACKGROUNDS))
        self.num_samples = num_samples
        self.transform = transform
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # the drawings stay, the random augmentation of each changes per epoch

    def example(self, index: int):
        """(PIL image, caption, label) of sample ``index``."""
        from PIL import Image

        rng = np.random.default_rng([self.seed, index])
        colour, shape = self.combinations[int(rng.integers(len(self.combinations)))]
        background = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        pixels, attributes = shapes.render_example(rng, self.image_size, colour, shape, background)
        attributes.update(colour=colour, shape=shape, background=background)
        caption = shapes.make_caption(random.Random(int(rng.integers(2**62))), attributes)
        return Image.fromarray(pixels), caption, shapes.class_names().index(f"{colour} {shape}")

    def __getitem__(self, index: int):
        image, caption, _ = self.example(index)
        pixels = seeded_transform(self.transform, image, self.seed, self.epoch, index)
        return pixels, self.tokenizer([caption])[0], 0

