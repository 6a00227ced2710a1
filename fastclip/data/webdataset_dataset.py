"""``--dataset-type webdataset``: tar shards of (image, caption) pairs, read with the webdataset package.

Shards are shuffled per epoch with a (seed, epoch) generator, dealt to ranks and then to DataLoader
workers; samples are shuffled in a buffer seeded the same way, so an epoch's order is reproducible and
a resumed run can replay it. Unreadable images are counted and skipped.
"""
from __future__ import annotations

import itertools
import random
from typing import Callable

import torch

from fastclip.data.image_io import load_rgb_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "caption", "text")


def expand_urls(urls: str) -> list[str]:
    """``"a-{000..009}.tar::b.tar"`` -> the list of shard paths (open_clip's ``::`` separator)."""
    import braceexpand  # a dependency of webdataset

    return [url for part in urls.split("::") for url in braceexpand.braceexpand(part)]


class WebDatasetPairs(torch.utils.data.IterableDataset):
    """Yields ``(image, tokens, skipped)`` like the map-style datasets, endlessly (epochs of shards).

    image (3, H, W) float from ``transform``; tokens (context_length,) int64; ``skipped`` = unreadable
    samples dropped since the previous yield of this worker.
    """

    def __init__(self, urls: str, transform: Callable, tokenizer: Callable, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000):
        try:
            import webdataset  # noqa: F401
        except ImportError as error:
            raise ImportError("--dataset-type webdataset needs the webdataset package: "
                              "pip install webdataset (or pip install 'fastclip[train]')") from error
        self.shards = expand_urls(urls)
        if not self.shards:
            raise ValueError(f"--train-data {urls!r} names no shards")
        self.transform, self.tokenizer = transform, tokenizer
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_shards(self, pass_index: int) -> list[str]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        consumers = self.world_size * num_workers
        if len(self.shards) < consumers:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world_size} ranks x "
                             f"{num_workers} workers; use more shards or fewer --workers")
        order = list(self.shards)
        random.Random(f"{self.seed}-{self.epoch}-{pass_index}").shuffle(order)
        return order[self.rank * num_workers + worker_id:: consumers]

    def _samples(self):
        import webdataset as wds

        for pass_index in itertools.count():
            stream = wds.tarfile_to_samples(handler=wds.warn_and_continue)(
                {"url": url} for url in self._my_shards(pass_index))
            yield from stream

    def __iter__(self):
        buffer: list = []
        rng = random.Random(f"{self.seed}-{self.epoch}-buffer-{self.rank}")
        skipped = 0
        for sample in self._samples():
            image_key = next((key for key in IMAGE_EXTENSIONS if key in sample), None)
            text_key = next((key for key in CAPTION_EXTENSIONS if key in sample), None)
            if image_key is None or text_key is None:
                skipped += 1
                continue
            buffer.append((sample[image_key], sample[text_key]))
            if len(buffer) < self.shuffle_buffer:
                continue
            encoded, caption = buffer.pop(rng.randrange(len(buffer)))
            image = load_rgb_image(encoded)
            if image is None:
                skipped += 1
                continue
            caption = caption.decode("utf-8") if isinstance(caption, bytes) else caption
            yield self.transform(image), self.tokenizer([caption])[0], skipped
            skipped = 0
