"""Portable chunked PyTorch primitives of the CLIP loss (the reference backend).

With S = scale * image @ text.T + bias over a block of rows (image, b x D) and columns (text, n x D):

    clip_loss_fwd -> row_lse[i]  = log sum_j exp(S_ij)            (b,)
                     col_lse[j]  = log sum_i exp(S_ij)            (n,)  partial over these rows
                     row_expect[i] = sum_j P_ij log P_ij  (b,)  only if with_expectations (P the row
                     col_expect[j] = sum_i Q_ij log Q_ij  (n,)  softmax, Q the column one; minus the entropy)
    clip_loss_bwd -> with P = exp(S - row_lse), Q = exp(S - col_lse), positives j = i + positive_offset,
                     G_ij = row_coef_i (P_ij - [pos]) + col_coef_j (Q_ij - [pos])
                     grad_image = scale * G @ text,  grad_text = scale * G.T @ image   (fp32)
                     grad_scale = sum_ij (R_ij log P_ij + C_ij log Q_ij) / scale   (G = R + C, the two
                     terms above; the block's share of d/d scale, see fastclip/ops/__init__.py)

Equivalent plain PyTorch (materialises S, which this file never does)::

    S = scale * image @ text.T + bias
    row_lse, col_lse = S.logsumexp(1), S.logsumexp(0)

A shared bias shifts every logit equally, so it only adds to the log-sum-exps and cancels in P and Q:
the chunks work on scale * x alone. Rows are walked in chunks sized by ``fastclip.ops.workspace``
(two reusable chunk x n fp32 buffers forward, three backward), so memory stays O(chunk * n + (b + n) * D).
grad_scale sums each part of G times the exponent it came from (log P or log Q, the chunk's logits
minus the saved log-sum-exps), with torch's cascade sum. Where a softmax sits almost all on its
positive, d/d scale is a small difference; sum G x would multiply the lse's fp32 rounding (which
leaves sum_j P_ij off 1 by ~|S| eps) by |S|, this form by the entropy: open_clip's precision or better.

The expectations are of log-probabilities, not of x: a local loss's d loss_i / d scale is
E_P[x] - x_ii = (E_P[log P] - log P_ii) / scale = (row_expect_i + CE_i) / scale, and E_P[log P] is
small where the softmax is peaked, so neither its sums nor its merges cancel |S|-sized terms
(E_P[x] ~ |x| would lose ~|x| eps at each, ~5x open_clip's error through a ring; issue 18).

Forward column statistics reuse the row pass: with P'_ij = exp(S_ij - m_i) (m_i the row max) and
M the chunk max, sum_i exp(S_ij - M) = sum_i exp(m_i - M) P'_ij is one GEMV. Where that sum falls
below 1e-30 (a column far below the chunk max, where fp32 would lose digits) the column is redone
exactly with its own max. With expectations every column is shifted by its own max instead (two
more passes over the chunk, on the local-loss path only). ``deterministic`` is part of every backend's signature; this backend is
always bitwise repeatable.
"""
from __future__ import annotations

import torch

from fastclip.devices import accumulate_dtype, gemm_dtype
from fastclip.ops.chunking import (ChunkBuffers, feature_grads_of_chunk, merge_lse, positive_entries,
                                   scaled_logits_into, uniform_value)
from fastclip.ops.output_shapes import clip_stats_like, gradients_like

TINY_COLUMN_SUM = 1e-30  # below this the one-GEMV column sum is recomputed exactly


def _expected_log(weights: torch.Tensor, total: torch.Tensor, log_total: torch.Tensor, dim: int) -> torch.Tensor:
    """E[log p] = sum w log w / l - log l from w = exp(S - max) (overwritten), l = sum w, along ``dim``.

    log w is taken back from w by xlogy (w = 0 gives 0, never 0 * -inf); its error is ~eps absolute.
    """
    return torch.xlogy(weights, weights, out=weights).sum(dim=dim) / total - log_total


def _column_stats_with_expectations(logits: torch.Tensor, scratch: torch.Tensor):
    """(lse, E[log q]) of every column of the chunk, each shifted by its own max (exact, no GEMV:
    the local loss's d scale needs E[log q] to ~eps |S|, which the shared-max GEMV misses)."""
    col_max = logits.amax(dim=0)
    torch.sub(logits, col_max, out=scratch).exp_()
    total = scratch.sum(dim=0)
    log_total = total.log()
    return col_max + log_total, _expected_log(scratch, total, log_total, dim=0)


def _column_lse(logits: torch.Tensor, row_weights: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """Column log-sum-exps of the chunk from the row pass's P' = exp(S - m_i): one GEMV, with the
    columns whose sum falls below TINY_COLUMN_SUM redone with their own max."""
    chunk_max = row_max.max()
    chunk_sum = torch.mv(row_weights.t(), (row_max - chunk_max).exp())  # sum_i exp(S_ij - M)
    chunk_lse = chunk_max + chunk_sum.log()
    lost = (chunk_sum < TINY_COLUMN_SUM).nonzero().squeeze(1)
    if lost.numel():
        block = logits[:, lost]
        block_max = block.amax(dim=0)
        chunk_lse[lost] = block_max + (block - block_max).exp_().sum(dim=0).log()
    return chunk_lse


@torch.library.custom_op("fastclip::clip_loss_fwd_torch", mutates_args=())
def clip_loss_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  with_expectations: bool, deterministic: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, n_cols = image.shape[0], text.shape[0]
    accumulate = accumulate_dtype(image)
    scale, bias = scale.to(accumulate), bias.to(accumulate)
    image_gemm, text_gemm = image.to(gemm_dtype(image)), text.to(gemm_dtype(text))
    options = dict(dtype=accumulate, device=image.device)
    row_lse = torch.empty(n_rows, **options)
    row_expect = torch.empty(n_rows if with_expectations else 0, **options)
    col_lse = torch.full((n_cols,), float("-inf"), **options)
    col_expect = torch.zeros(n_cols if with_expectations else 0, **options)
    buffers = ChunkBuffers(n_rows, n_cols, 2, accumulate, image.device)
    for start, stop, (logits, weights) in buffers.ranges():
        scaled_logits_into(logits, image_gemm[start:stop], text_gemm, scale)  # scale * x, no bias
        row_max = logits.amax(dim=1)
        torch.sub(logits, row_max[:, None], out=weights).exp_()  # P' = exp(S - m_i)
        row_sum = weights.sum(dim=1)
        row_log_sum = row_sum.log()
        row_lse[start:stop] = row_max + row_log_sum
        if with_expectations:
            row_expect[start:stop] = _expected_log(weights, row_sum, row_log_sum, dim=1)
            chunk_lse, chunk_expect = _column_stats_with_expectations(logits, weights)
        else:
            chunk_lse, chunk_expect = _column_lse(logits, weights, row_max), None
        col_lse, col_expect = merge_lse(col_lse, col_expect if with_expectations else None, chunk_lse, chunk_expect)
    if not with_expectations:
        col_expect = torch.zeros(0, **options)
    return row_lse + bias, col_lse + bias, row_expect, col_expect


@clip_loss_fwd.register_fake
def _(image, text, scale, bias, with_expectations, deterministic):
    return clip_stats_like(image, text, with_expectations, accumulate_dtype(image))


def _softmax_part(log_softmax: torch.Tensor, out: torch.Tensor, weights, positives) -> torch.Tensor:
    """out = w (exp(log_softmax) - [pos]), one direction's part of G; returns sum out * log_softmax.

    weights: None (w = 1) or (w broadcast over the chunk, w at each positive). The sum is the scale
    gradient's share of this part, times scale: see the module docstring. log_softmax is overwritten.
    """
    rows, cols = positives
    torch.exp(log_softmax, out=out)
    if weights is None:
        out[rows, cols] -= 1.0
    else:
        out.mul_(weights[0])
        out[rows, cols] -= weights[1]
    return torch.mul(out, log_softmax, out=log_softmax).sum()  # torch's cascade sum, not one long dot


@torch.library.custom_op("fastclip::clip_loss_bwd_torch", mutates_args=())
def clip_loss_bwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  row_lse: torch.Tensor, col_lse: torch.Tensor, row_coef: torch.Tensor, col_coef: torch.Tensor,
                  positive_offset: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, n_cols = image.shape[0], text.shape[0]
    accumulate = accumulate_dtype(image)
    scale, bias = scale.to(accumulate), bias.to(accumulate)
    image_gemm, text_gemm = image.to(gemm_dtype(image)), text.to(gemm_dtype(text))
    row_shift, col_shift = (row_lse - bias)[:, None], (col_lse - bias)[None, :]  # the chunks carry no bias
    row_coef, col_coef = row_coef.to(accumulate), col_coef.to(accumulate)
    # With one coefficient everywhere (reduction mean/sum), G = coef * (P + Q - 2[pos]) and the
    # coefficient moves onto the (b + n) x D outputs: two fewer passes over each chunk.
    common = uniform_value(row_coef, col_coef)
    grad_image = torch.empty(image.shape, dtype=accumulate, device=image.device)
    grad_text = torch.zeros(text.shape, dtype=accumulate, device=image.device)
    grad_scale = torch.zeros((), dtype=accumulate, device=image.device)  # scale * the share, below
    buffers = ChunkBuffers(n_rows, n_cols, 3, accumulate, image.device)
    for start, stop, (row_log, grad_logits, col_log) in buffers.ranges():
        scaled_logits_into(row_log, image_gemm[start:stop], text_gemm, scale)  # scale * x
        torch.sub(row_log, col_shift, out=col_log)  # log Q
        row_log.sub_(row_shift[start:stop])  # log P, in place of the logits
        positives = positive_entries(start, stop, n_cols, positive_offset, image.device)
        rows, cols = positives
        if common is None:
            row_weights, col_weights = (row_coef[start:stop, None], row_coef[rows + start]), (col_coef, col_coef[cols])
        else:
            row_weights = col_weights = None
        grad_scale += _softmax_part(row_log, grad_logits, row_weights, positives)  # row part in grad_logits
        grad_scale += _softmax_part(col_log, row_log, col_weights, positives)  # column part in row_log
        grad_logits.add_(row_log)  # G (divided by the coefficient when it is uniform)
        feature_grads_of_chunk(grad_logits, image_gemm[start:stop], text_gemm, grad_image[start:stop], grad_text)
    grad_scale = grad_scale / scale
    if common is not None:
        scale, grad_scale = scale * common, (grad_scale * common).reshape(())
    return grad_image.mul_(scale), grad_text.mul_(scale), grad_scale


@clip_loss_bwd.register_fake
def _(image, text, scale, bias, row_lse, col_lse, row_coef, col_coef, positive_offset, deterministic):
    return gradients_like(image, text, accumulate_dtype(image))
