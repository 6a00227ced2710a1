"""Helpers shared by the chunked PyTorch primitives of both losses.

Large fresh allocations are slow on CPU (every chunk would page-fault a new mmap), so each primitive
allocates its (chunk x n) buffers once per call and writes into them with ``out=``.
"""
from __future__ import annotations

import torch

from fastclip.ops.gemm import matmul_fp32
from fastclip.ops.workspace import rows_per_chunk


class ChunkBuffers:
    """``count`` reusable (chunk x n_cols) buffers of the accumulation dtype, and the chunk ranges."""

    def __init__(self, n_rows: int, n_cols: int, count: int, dtype: torch.dtype, device):
        self.n_rows = n_rows
        self.chunk = rows_per_chunk(n_rows, bytes_per_block=count * n_cols * (torch.finfo(dtype).bits // 8))
        self.buffers = [torch.empty(self.chunk, n_cols, dtype=dtype, device=device) for _ in range(count)]

    def ranges(self):
        for start in range(0, self.n_rows, self.chunk):
            stop = min(start + self.chunk, self.n_rows)
            yield start, stop, [buffer[: stop - start] for buffer in self.buffers]


def scaled_logits_into(out: torch.Tensor, image_chunk: torch.Tensor, text: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
    """out = scale * (image_chunk @ text.T): the GEMM written straight into the fp32 buffer, scaled after.

    The scale multiplies the GEMM's output, not the image rows: scaling the rows first rounds every
    scale * I_ik before the dot, and the logits' rounding is what the logit_scale gradient's log form
    reads (x = S / scale; ~2x open_clip's error near a zero loss against 1.2x scaled after, issue 18).
    """
    if image_chunk.dtype == out.dtype:
        torch.mm(image_chunk, text.t(), out=out)
    else:
        # Low-precision GEMM on accelerators. Its output stays fp32 (out_dtype, see fastclip.ops.gemm):
        # rounded to 16 bits, the logits would carry ~scale * 2^-9 of error each, which does not
        # cancel in lse - diagonal (a 2.5 % loss error at B=37 in bf16).
        out.copy_(matmul_fp32(image_chunk, text.t()))
    return out.mul_(scale)


def positive_entries(start: int, stop: int, n_cols: int, positive_offset: int, device) -> tuple:
    """(row index within the chunk, column index) of the positive pairs j = i + positive_offset."""
    rows = torch.arange(start, stop, device=device)
    cols = rows + positive_offset
    valid = (cols >= 0) & (cols < n_cols)
    return rows[valid] - start, cols[valid]


def add_product(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """out += left @ right, accumulating in out's dtype even when the GEMM runs in a lower precision."""
    if left.dtype == out.dtype:
        out.addmm_(left, right)
    else:
        out.add_(torch.mm(left, right).to(out.dtype))


def feature_grads_of_chunk(grad_logits: torch.Tensor, image_chunk: torch.Tensor, text: torch.Tensor,
                           grad_image_chunk: torch.Tensor, grad_text: torch.Tensor) -> None:
    """grad_image_chunk = G @ text and grad_text += G.T @ image_chunk (unscaled), GEMMs in the inputs' dtype."""
    grad_gemm = grad_logits if grad_logits.dtype == image_chunk.dtype else grad_logits.to(image_chunk.dtype)
    if grad_gemm.dtype == grad_image_chunk.dtype:
        torch.mm(grad_gemm, text, out=grad_image_chunk)
    else:
        grad_image_chunk.copy_(torch.mm(grad_gemm, text))
    add_product(grad_text, grad_gemm.t(), image_chunk)


def merge_lse(lse_a: torch.Tensor, expect_a, lse_b: torch.Tensor, expect_b):
    """Merge softmax statistics of two disjoint parts: (log-sum-exp, E[log softmax] or None).

    With M = max(lse_a, lse_b) and l_k = e^(lse_k - M): lse = M + log l, l = l_a + l_b, and the
    expected log-probability, expect = sum_k l_k (expect_k + lse_k - M) / l - log l. The weights are
    normalised by the division (their rounding cancels) and each term is <= 0 (nothing cancels):
    kernels/common.py's merge kernel does the same on (max, sum, weighted sum).
    """
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)  # two empty parts stay empty
    weight_a, weight_b = (lse_a - top).exp(), (lse_b - top).exp()
    total = weight_a + weight_b
    log_total = total.log()
    merged = top + log_total
    if expect_a is None:
        return merged, None
    gap_a = torch.where(weight_a > 0, expect_a + (lse_a - top), torch.zeros_like(top))
    gap_b = torch.where(weight_b > 0, expect_b + (lse_b - top), torch.zeros_like(top))
    return merged, (weight_a * gap_a + weight_b * gap_b) / total - log_total


def uniform_value(row_coef: torch.Tensor, col_coef: torch.Tensor):
    """The common value when every row and column coefficient is the same (the "mean"/"sum" case), else None."""
    first = row_coef[:1]
    if bool((row_coef == first).all()) and bool((col_coef == first).all()):
        return first
    return None
