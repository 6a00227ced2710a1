"""Portable chunked PyTorch primitives of the CLIP loss (the reference backend).

With S = scale * image @ text.T + bias over a block of rows (image, b x D) and columns (text, n x D):

    clip_loss_fwd -> row_lse[i]  = log sum_j exp(S_ij)            (b,)
                     col_lse[j]  = log sum_i exp(S_ij)            (n,)  partial over these rows
                     row_expect[i] = sum_j softmax_j(S)_ij x_ij     (b,)  only if with_expectations
                     col_expect[j] = sum_i softmax_i(S)_ij x_ij     (n,)  likewise; x = image @ text.T
    clip_loss_bwd -> with P = exp(S - row_lse), Q = exp(S - col_lse), positives j = i + positive_offset,
                     G_ij = row_coef_i (P_ij - [pos]) + col_coef_j (Q_ij - [pos])
                     grad_image = scale * G @ text,  grad_text = scale * G.T @ image   (fp32)

Equivalent plain PyTorch (materialises S, which this file never does)::

    S = scale * image @ text.T + bias
    row_lse, col_lse = S.logsumexp(1), S.logsumexp(0)

``deterministic`` is part of every backend's signature; this backend is always bitwise repeatable.
Rows are walked in chunks sized by ``fastclip.ops.workspace`` (two chunk x n fp32 buffers), so memory
stays O(chunk * n + (b + n) * D). Column statistics are merged across chunks online (max, sum-exp).
"""
from __future__ import annotations

import torch

from fastclip.ops.chunking import (accumulate_dtype, add_scaled_product, chunk_logits, gemm_dtype,
                                   positive_entries)
from fastclip.ops.workspace import rows_per_chunk


@torch.library.custom_op("fastclip::clip_loss_fwd_torch", mutates_args=())
def clip_loss_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  with_expectations: bool, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, n_cols = image.shape[0], text.shape[0]
    accumulate = accumulate_dtype(image)
    scale, bias = scale.to(accumulate), bias.to(accumulate)
    text_gemm = text.to(gemm_dtype(text))
    image_gemm = image.to(gemm_dtype(image))
    options = dict(dtype=accumulate, device=image.device)
    row_lse = torch.empty(n_rows, **options)
    row_expect = torch.empty(n_rows if with_expectations else 0, **options)
    col_max = torch.full((n_cols,), float("-inf"), **options)
    col_sum = torch.zeros(n_cols, **options)
    col_weighted = torch.zeros(n_cols if with_expectations else 0, **options)
    chunk = rows_per_chunk(n_rows, n_cols, buffers=2, bytes_per_element=row_lse.element_size())
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        logits = chunk_logits(image_gemm[start:stop], text_gemm, scale, bias, accumulate)
        # Row statistics: one exp pass shifted by the row max.
        row_max = logits.amax(dim=1, keepdim=True)
        weights = torch.sub(logits, row_max).exp_()
        row_sum = weights.sum(dim=1)
        row_lse[start:stop] = row_max.squeeze(1) + row_sum.log()
        if with_expectations:
            row_expect[start:stop] = weights.mul_(logits).sum(dim=1) / row_sum
        # Column statistics of this chunk, shifted by the chunk's column max, then merged online.
        chunk_max = logits.amax(dim=0)
        torch.sub(logits, chunk_max, out=weights).exp_()
        chunk_sum = weights.sum(dim=0)
        new_max = torch.maximum(col_max, chunk_max)
        old_factor, chunk_factor = (col_max - new_max).exp(), (chunk_max - new_max).exp()
        col_sum = col_sum * old_factor + chunk_sum * chunk_factor
        if with_expectations:
            col_weighted = col_weighted * old_factor + weights.mul_(logits).sum(dim=0) * chunk_factor
        col_max = new_max
    col_lse = col_max + col_sum.log()
    if with_expectations:  # expectations of S -> expectations of x = (S - bias) / scale
        row_expect = (row_expect - bias) / scale
        col_expect = (col_weighted / col_sum - bias) / scale
    else:
        col_expect = col_weighted
    return row_lse, col_lse, row_expect, col_expect


@clip_loss_fwd.register_fake
def _(image, text, scale, bias, with_expectations, deterministic):
    accumulate = accumulate_dtype(image)
    n_rows, n_cols = image.shape[0], text.shape[0]
    expect = (n_rows, n_cols) if with_expectations else (0, 0)
    return (image.new_empty(n_rows, dtype=accumulate), image.new_empty(n_cols, dtype=accumulate),
            image.new_empty(expect[0], dtype=accumulate), image.new_empty(expect[1], dtype=accumulate))


@torch.library.custom_op("fastclip::clip_loss_bwd_torch", mutates_args=())
def clip_loss_bwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  row_lse: torch.Tensor, col_lse: torch.Tensor, row_coef: torch.Tensor, col_coef: torch.Tensor,
                  positive_offset: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = image.shape[0], text.shape[0]
    accumulate = accumulate_dtype(image)
    scale, bias = scale.to(accumulate), bias.to(accumulate)
    image_gemm, text_gemm = image.to(gemm_dtype(image)), text.to(gemm_dtype(text))
    grad_image = torch.empty(image.shape, dtype=accumulate, device=image.device)
    grad_text = torch.zeros(text.shape, dtype=accumulate, device=image.device)
    chunk = rows_per_chunk(n_rows, n_cols, buffers=2, bytes_per_element=grad_image.element_size())
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        logits = chunk_logits(image_gemm[start:stop], text_gemm, scale, bias, accumulate)
        # G = row_coef * P + col_coef * Q, the column part built in place in the logits buffer.
        grad_logits = torch.sub(logits, row_lse[start:stop, None]).exp_().mul_(row_coef[start:stop, None])
        grad_logits.add_(logits.sub_(col_lse).exp_().mul_(col_coef))
        del logits
        rows, cols = positive_entries(start, stop, n_cols, positive_offset, image.device)
        grad_logits[rows, cols] -= row_coef[rows + start] + col_coef[cols]
        grad_gemm = grad_logits.to(image_gemm.dtype)
        grad_image[start:stop] = torch.mm(grad_gemm, text_gemm)
        add_scaled_product(grad_text, grad_gemm.t(), image_gemm[start:stop])
    return grad_image.mul_(scale), grad_text.mul_(scale)


@clip_loss_bwd.register_fake
def _(image, text, scale, bias, row_lse, col_lse, row_coef, col_coef, positive_offset, deterministic):
    accumulate = accumulate_dtype(image)
    return image.new_empty(image.shape, dtype=accumulate), text.new_empty(text.shape, dtype=accumulate)
