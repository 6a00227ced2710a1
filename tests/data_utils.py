"""Tiny image-caption datasets on disk for the data tests: a CSV of PNGs, webdataset tar shards."""
import io
import random
import tarfile

import numpy as np
from PIL import Image


def write_pairs(folder, count, corrupt=()):
    """``count`` random PNGs + a TSV; indices in ``corrupt`` get garbage, truncated, empty or missing files."""
    rng = np.random.default_rng(random.randrange(2**31))
    lines = ["filepath\ttitle"]
    for index in range(count):
        name = f"img{index:03d}.png"
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
        data = buffer.getvalue()
        if index in corrupt:
            kind = corrupt[index]
            data = {"garbage": b"not an image at all", "truncated": data[: len(data) // 3], "empty": b"",
                    "missing": None}[kind]
        if data is not None:
            (folder / name).write_bytes(data)
        lines.append(f"{name}\tcaption number {index}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


def write_shards(folder, shards, per_shard, corrupt_every=0):
    rng = np.random.default_rng(random.randrange(2**31))
    count = 0
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:02d}.tar", "w") as tar:
            for item in range(per_shard):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(buffer, format="PNG")
                image = buffer.getvalue()
                if corrupt_every and count % corrupt_every == 0:
                    image = b"\x89PNG broken"
                count += 1
                for suffix, data in (("png", image), ("txt", f"pair {shard} {item}".encode())):
                    info = tarfile.TarInfo(f"s{shard:02d}_{item:04d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / ("shard-{00..%02d}.tar" % (shards - 1)))
