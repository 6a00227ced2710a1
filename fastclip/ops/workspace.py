"""The bounded transient workspace of the chunked loss primitives.

A primitive that walks the B_rows x B_cols similarity matrix in row chunks keeps a few
(chunk x B_cols) fp32 buffers alive at a time. Their total is capped by ``workspace_bytes()``:
128 MiB by default (docs/design.md: at most 256 by default), changed with the environment variable ``FASTCLIP_WORKSPACE_MB`` (read at call
time, so a script can set it before the first loss call).
"""
import math
import os

DEFAULT_WORKSPACE_MB = 128


def workspace_bytes() -> int:
    raw = os.environ.get("FASTCLIP_WORKSPACE_MB", "")
    if not raw:
        return DEFAULT_WORKSPACE_MB * 2**20
    try:
        megabytes = float(raw)
    except ValueError:
        raise ValueError(f"FASTCLIP_WORKSPACE_MB={raw!r} is not a number: set it to megabytes, e.g. 256") from None
    if not math.isfinite(megabytes) or megabytes <= 0:
        raise ValueError(f"FASTCLIP_WORKSPACE_MB={raw!r} must be a positive, finite number of megabytes, e.g. 256")
    return int(megabytes * 2**20)


def rows_per_chunk(n_rows: int, n_cols: int, buffers: int, bytes_per_element: int = 4) -> int:
    """Largest row chunk whose ``buffers`` (chunk x n_cols) buffers fit the workspace (at least 1 row)."""
    per_row = max(1, buffers * n_cols * bytes_per_element)
    return max(1, min(n_rows, workspace_bytes() // per_row))
