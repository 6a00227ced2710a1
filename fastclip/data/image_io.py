"""Robust image loading: a corrupt or missing file is reported and skipped, never a crashed worker."""
from __future__ import annotations

import io
import logging
import os
from typing import Callable

logger = logging.getLogger("fastclip.data")

#: how many replacement samples a dataset tries before it gives up on a run of unreadable images
MAX_CONSECUTIVE_BAD_IMAGES = 32
_reported_paths = 0
_REPORT_LIMIT = 10  # per process: enough to find the culprits, not enough to flood the log


def load_rgb_image(source: str | os.PathLike | bytes):
    """Decode ``source`` (a path or the encoded bytes) into an RGB ``PIL.Image``, or return ``None``.

    The pixels are decoded eagerly (``Image.load``), so truncated files fail here rather than later in
    a transform. Every failure (missing file, unknown format, truncated data, decompression bomb) is
    logged for the first few files of a process and turned into ``None``.
    """
    from PIL import Image

    global _reported_paths
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
        with handle, Image.open(handle) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        if _reported_paths < _REPORT_LIMIT:
            _reported_paths += 1
            name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
            logger.warning("skipping unreadable image %s: %s: %s", name, type(error).__name__, error)
        return None


class UnreadableDataError(ValueError):
    """Data that cannot feed training at all: a long run of unreadable images, or a source with no sample."""


def first_readable(index: int, length: int, load: Callable[[int], object],
                   describe: Callable[[int], str] | None = None):
    """Call ``load(i)`` for ``index`` and then deterministic replacements until one is not ``None``.

    Returns ``(result, used_index, skipped)``: ``skipped`` counts the unreadable samples passed over. The
    replacement order is a fixed stride through the dataset, so a resumed run replaces a bad image with
    the same sample as the original run did, and the batch size never changes (DDP gathers need equal
    batch sizes on every rank). ``describe(i)`` names sample ``i`` in the error raised when
    ``MAX_CONSECUTIVE_BAD_IMAGES`` in a row cannot be read.
    """
    stride = 7919 % length or 1  # a prime stride: walks away from clustered bad files
    for skipped in range(min(MAX_CONSECUTIVE_BAD_IMAGES, length)):
        candidate = (index + skipped * stride) % length
        result = load(candidate)
        if result is not None:
            return result, candidate, skipped
    example = f" (the first: {describe(index)})" if describe is not None else ""
    raise UnreadableDataError(
        f"{min(MAX_CONSECUTIVE_BAD_IMAGES, length)} images in a row around index {index} could not be read{example}; "
        "check that the image files exist and decode (relative paths are resolved against the CSV's folder)")
