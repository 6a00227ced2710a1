"""``--dataset-type webdataset``: tar shards of (image, caption) pairs, read with the webdataset package.

Shards are shuffled per epoch with a (seed, epoch) generator, dealt to ranks and then to DataLoader
workers; or, with ``resampled=True`` (open_clip's ``--dataset-resampled``), each worker draws shards with
replacement from all of them (weighted per ``::`` source by ``source_weights``, open_clip's
``--train-data-upsampling-factors``) from a (seed, epoch, rank, worker) generator; samples are shuffled in a buffer seeded the same way, so an epoch's order is reproducible and
a resumed run can replay it. Samples without an image or caption, and images that do not decode,
are counted and skipped; a shard that cannot be read is logged and skipped; shards that yield no
usable sample in a whole pass are an error (never an endless loop).
"""
from __future__ import annotations

import itertools
import logging
import os
import random
from typing import Callable

import torch

from fastclip.data.image_io import UnreadableDataError, load_rgb_image

logger = logging.getLogger("fastclip.data")
_REPORT_LIMIT = 10  # shards reported per worker

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "caption", "text")


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _no_sample_message(shards: list[str], tally: dict) -> str:
    names = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
    return (f"a full pass over {len(shards)} shard(s) ({names}) gave no usable sample: {tally['incomplete']} "
            f"sample(s) lacked an image ({'/'.join(IMAGE_EXTENSIONS)}) or a caption ({'/'.join(CAPTION_EXTENSIONS)}), "
            f"{tally['unreadable']} image(s) did not decode, {tally['bad_shards']} shard(s) could not be read. "
            "Check the shards (tar -tf), or give --train-data shards that hold image-caption pairs")


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
                 world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000, resampled: bool = False,
                 source_weights: list[float] | None = None):
        try:
            import webdataset  # noqa: F401
        except ImportError as error:
            raise ImportError("--dataset-type webdataset needs the webdataset package: "
                              "pip install webdataset (or pip install 'fastclip[train]')") from error
        sources = [expand_urls(part) for part in urls.split("::")]
        self.shards = [url for shards in sources for url in shards]
        if source_weights is not None and len(source_weights) != len(sources):
            raise ValueError(f"{len(source_weights)} upsampling factors for {len(sources)} '::' sources of --train-data")
        # a shard's draw weight: its source's factor (each shard alike without factors), as open_clip's
        self.shard_weights = [weight for weight, shards in zip(source_weights or [1.0] * len(sources), sources)
                              for _ in shards]
        self.resampled = resampled
        if not self.shards:
            raise ValueError(f"--train-data {urls!r} names no shards")
        missing = [url for url in self.shards if _is_local(url) and not os.path.isfile(url)]
        if missing:
            raise ValueError(f"--train-data: {len(missing)} of {len(self.shards)} shards do not exist (e.g. "
                             f"{', '.join(missing[:3])}); check the path and the {{first..last}} range")
        self.transform, self.tokenizer = transform, tokenizer
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_shards(self, pass_index: int) -> list[str]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        if self.resampled:  # with replacement: as many draws as shards, from this worker's own generator
            draw = random.Random(f"{self.seed}-{self.epoch}-{pass_index}-{self.rank}-{worker_id}")
            return draw.choices(self.shards, weights=self.shard_weights, k=len(self.shards))
        consumers = self.world_size * num_workers
        if len(self.shards) < consumers:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world_size} ranks x "
                             f"{num_workers} workers; use more shards or fewer --workers")
        order = list(self.shards)
        random.Random(f"{self.seed}-{self.epoch}-{pass_index}").shuffle(order)
        return order[self.rank * num_workers + worker_id:: consumers]

    def _samples(self, shards: list[str], tally: dict):
        """The raw samples of one pass over ``shards``. A shard that cannot be opened or read (missing,
        not a tar, truncated) is logged and counted in ``tally["bad_shards"]``, and the pass goes on."""
        import webdataset as wds

        def skip_shard(error: Exception) -> bool:
            tally["bad_shards"] += 1
            if tally["bad_shards"] <= _REPORT_LIMIT:
                url = next((arg for arg in reversed(error.args) if isinstance(arg, str) and arg in shards), "a shard")
                logger.warning("skipping (the rest of) %s: %s: %s", url, type(error).__name__, error.args[0])
            return True

        return wds.tarfile_to_samples(handler=skip_shard)({"url": url} for url in shards)

    def _fill(self, shards: list[str], buffer: list, rng: random.Random, tally: dict):
        """One pass over ``shards`` through the shuffle buffer: yields an encoded (image, caption) pair
        drawn at random from the buffer each time a new pair fills it."""
        for sample in self._samples(shards, tally):
            image_key = next((key for key in IMAGE_EXTENSIONS if key in sample), None)
            text_key = next((key for key in CAPTION_EXTENSIONS if key in sample), None)
            if image_key is None or text_key is None:
                tally["incomplete"] += 1
                tally["skipped"] += 1
                continue
            buffer.append((sample[image_key], sample[text_key]))
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))

    def _serve(self, pairs, tally: dict):
        """Decode encoded pairs into ``(pixels, tokens, skipped)``; images that do not decode are counted."""
        for encoded, caption in pairs:
            image = load_rgb_image(encoded)
            if image is None:
                tally["unreadable"] += 1
                tally["skipped"] += 1
                continue
            caption = caption.decode("utf-8", errors="replace") if isinstance(caption, bytes) else caption
            yield self.transform(image), self.tokenizer([caption])[0], tally["skipped"]
            tally["skipped"] = 0
            tally["yielded"] += 1

    def __iter__(self):
        """Endless passes over this worker's shards. A pass that yields nothing (fewer pairs than the
        buffer holds, or only bad ones) empties the buffer in random order; if that yields nothing
        either, the shards hold no usable sample, which is an error rather than an endless loop."""
        buffer: list = []
        rng = random.Random(f"{self.seed}-{self.epoch}-buffer-{self.rank}")
        tally = {"incomplete": 0, "unreadable": 0, "bad_shards": 0, "skipped": 0, "yielded": 0}
        for pass_index in itertools.count():
            shards = self._my_shards(pass_index)
            tally["yielded"] = 0
            yield from self._serve(self._fill(shards, buffer, rng, tally), tally)
            if not tally["yielded"]:
                yield from self._serve((buffer.pop(rng.randrange(len(buffer))) for _ in range(len(buffer))), tally)
            if not tally["yielded"]:
                raise UnreadableDataError(_no_sample_message(shards, tally))
