"""The bounded transient workspace of the chunked loss primitives.

A primitive that walks the B_rows x B_cols similarity matrix in row chunks keeps a few
(chunk x B_cols) buffers alive at a time (the Triton backward: G in the input dtype; the torch
backend: fp32 buffers). Their total is capped by ``workspace_bytes()``: DEFAULT_WORKSPACE_MB by
default, changed with the environment variable ``FASTCLIP_WORKSPACE_MB`` (MiB, read at call time,
so a script can set it before the first loss call). The GPU benchmark reads the same value.

Every output and workspace of the fused launchers comes from ``allocate`` (Triton) or from the CUDA
extension, which is handed ``POISON_BUFFERS``: a test sets that flag to make both fill their buffers
with NaN (integers with -1) first, so an element no kernel writes shows up.
"""
import math
import os

import torch

POISON_BUFFERS = False  # tests only: see the module docstring
MAX_WORKSPACE_ELEMENTS = 2**31 - 1  # the kernels index one workspace with 32-bit offsets

# 256 MiB, the design's cap for the default. Why the cap and not less: the semi-fused backward
# re-reads and re-writes grad_text (n x D fp32, 8 bytes per element) once per row chunk, and a chunk
# holds workspace / (n * elt) rows, so that traffic is 8 B^2 D elt / workspace. At B = 65536, D = 512,
# bf16 it is 17 GB per backward at 128 MiB (~3.6 ms at H200's 4.8 TB/s, ~20% of the 4-GEMM floor of
# ~18 ms at 989 bf16 TFLOP/s) and half that at 256 MiB; G's own traffic (~6 bytes per S element) does
# not depend on it. 256 MiB is < 0.2% of an 80-141 GB GPU. (Estimate, not measured on GPU.)
DEFAULT_WORKSPACE_MB = 256


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


def rows_per_chunk(n_rows: int, bytes_per_block: int, block_rows: int = 1, elements_per_block: int = 0) -> int:
    """Rows per chunk of a row-chunked primitive: the most whole blocks of ``block_rows`` rows whose
    workspace (``bytes_per_block`` bytes, ``elements_per_block`` elements of one buffer, per block)
    fits workspace_bytes() and 32-bit indexing; at least one block, at most n_rows (and at least 1)."""
    blocks = workspace_bytes() // max(1, bytes_per_block)
    if elements_per_block:
        blocks = min(blocks, MAX_WORKSPACE_ELEMENTS // elements_per_block)
    return max(1, min(n_rows, max(1, blocks) * block_rows))


def allocate(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer for a kernel to fill; NaN (or -1) under POISON_BUFFERS."""
    if POISON_BUFFERS:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
