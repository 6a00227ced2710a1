"""What every backend's primitives return, as empty tensors: the one place their fake kernels share.

The shapes follow the primitive contract in fastclip/ops/__init__.py; ``dtype`` is the backend's output
dtype (fp32 for triton and cuda, the accumulation dtype for torch).
"""
from __future__ import annotations

import torch


def clip_stats_like(image: torch.Tensor, text: torch.Tensor, with_expectations: bool, dtype: torch.dtype):
    """(row_lse (b,), col_lse (n,), row_expect (b,) or (0,), col_expect (n,) or (0,))."""
    n_rows, n_cols = image.shape[0], text.shape[0]
    expect = (n_rows, n_cols) if with_expectations else (0, 0)
    return (image.new_empty(n_rows, dtype=dtype), image.new_empty(n_cols, dtype=dtype),
            image.new_empty(expect[0], dtype=dtype), image.new_empty(expect[1], dtype=dtype))


def gradients_like(image: torch.Tensor, text: torch.Tensor, dtype: torch.dtype):
    """(grad_image (b, D), grad_text (n, D), a 0-dim gradient: d scale for CLIP, d bias for SigLIP)."""
    return (image.new_empty(image.shape, dtype=dtype), text.new_empty(text.shape, dtype=dtype),
            image.new_empty((), dtype=dtype))
