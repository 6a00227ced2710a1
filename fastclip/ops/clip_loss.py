"""The CLIP loss as one autograd Function over any backend's primitives, never materialising B x B.

    L = 1/2 [ mean_i CE(S_i,:, i) + mean_j CE(S_:,j, j) ],   S = scale * I @ T.T + bias

Per pair i: loss_i = 1/2 [(row_lse_i - S_ii) + (col_lse_i - S_ii)], so the forward needs only the
row and column log-sum-exp (O(B), from one pass over S) and the diagonal. ``reduction`` is "mean"
(the drop-in value), "sum", or "none" (the (B,) per-pair vector).

Backward, with g_i = dL/dloss_i and P/Q the row/column softmax of S:

    dL/dS_ij = g_i/2 (P_ij - [i=j]) + g_j/2 (Q_ij - [i=j])        (the backend's G, recomputed in chunks)
    dI = scale * G @ T,  dT = scale * G.T @ I
    dscale = sum_ij G_ij (I_i . T_j)   (summed by the backward primitive beside G, in log-softmax
                                        form for precision: fastclip/ops/__init__.py; no extra pass)
    dbias = sum_ij G_ij = 0 exactly (each softmax sums to one: a shared bias cancels in CE)

Saved for backward: the (normalised) inputs, the O(B) row/column log-sum-exp and, with
``normalize=True``, the O(B) norms. Equivalent plain PyTorch (materialising S)::

    S = scale * I @ T.T + bias; labels = torch.arange(B)
    loss = (F.cross_entropy(S, labels) + F.cross_entropy(S.T, labels)) / 2

Across ranks (``distributed`` set, see ``fastclip.distributed``) the same Function runs with the
columns (texts) of every rank: ``distributed.forward`` returns the loss value from the merged
statistics and ``distributed.backward`` the local gradients, both built from the per-pair helpers
below, so one process and many share one formula.
"""
from __future__ import annotations

import torch

from fastclip.backends import LossBackend
from fastclip.devices import accumulate_dtype
from fastclip.ops.chunking import row_dots
from fastclip.ops.normalize import normalize_rows, normalize_rows_backward
from fastclip.ops.options import ClipOptions

DEFAULT_OPTIONS = ClipOptions()


def pair_logits(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """S_ii - bias = scale * I_i . T_i for the (b,) local pairs, in the accumulation dtype."""
    return row_dots(image, text) * scale


def pair_losses(row_lse: torch.Tensor, col_lse: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
    """loss_i = 1/2 [(row_lse_i - S_ii) + (col_lse_i - S_ii)]  (b,): pair i's row and column CE, >= 0.

    S_ii comes from a row dot and the log-sum-exps from the primitive's tiles: where pair i holds
    almost all of both softmaxes the two roundings (~|S| eps) can leave a tiny negative value, and a
    cross-entropy is never negative, so it is clamped at 0. Backward does not read this value (the
    primitive's G is the gradient), so the clamp moves no gradient.
    """
    return (0.5 * ((row_lse - diagonal) + (col_lse - diagonal))).clamp_min(0.0)


def reduce_pairs(per_pair: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


def pair_weights(grad_output: torch.Tensor, reduction: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """g_i = d(grad_output . reduced value)/d loss_i for the n pairs this call reduced  (n,)."""
    weights = grad_output.to(dtype).expand(n) if reduction != "none" else grad_output.to(dtype)
    if reduction == "mean":
        weights = weights / n
    return weights


class ClipLossFunction(torch.autograd.Function):
    """apply(image, text, scale, bias, backend, options=ClipOptions(), distributed=None) -> the loss.

    image, text: (b, D); scale, bias: one-element tensors; backend: the ``LossBackend`` whose
    primitives run; options: the call's ``ClipOptions`` (normalize, reduction and deterministic are
    read here, the rest by ``distributed``); distributed: None for one process, else a
    ``fastclip.distributed.clip.DistributedClip``. Backward returns one gradient per tensor input and
    None for the other three.
    """

    @staticmethod
    def forward(ctx, image, text, scale, bias, backend: LossBackend, options: ClipOptions = DEFAULT_OPTIONS,
                distributed=None):
        op = backend.op("clip_loss")
        normalize, reduction, deterministic = options.normalize, options.reduction, options.deterministic
        image_norms = text_norms = None
        if normalize:
            image, image_norms = normalize_rows(image)
            text, text_norms = normalize_rows(text)
        scale_value = scale.detach().reshape(()).to(accumulate_dtype(image))
        # A shared bias cancels exactly in both cross-entropies, so it never enters the computation
        # (adding and removing it would only cost fp32 rounding on large logits).
        bias_value = torch.zeros((), dtype=scale_value.dtype, device=image.device)
        ctx.backend, ctx.options = backend, options
        ctx.scale_meta = (scale.shape, scale.dtype)
        ctx.bias_meta = (bias.shape, bias.dtype)
        ctx.distributed = distributed
        if distributed is not None:
            value, saved = distributed.forward(image, text, scale_value, bias_value, ctx.needs_input_grad[2])
            ctx.save_for_backward(image, text, scale_value, bias_value, image_norms, text_norms, *saved)
            return value
        row_lse, col_lse, _, _ = op.clip_loss_fwd(image, text, scale_value, bias_value, False, deterministic)
        per_pair = pair_losses(row_lse, col_lse, pair_logits(image, text, scale_value))
        if image.shape[0] == 1:  # a softmax over one entry is 1: both cross-entropies are exactly 0
            per_pair = torch.zeros_like(per_pair)
        ctx.save_for_backward(image, text, scale_value, bias_value, image_norms, text_norms, row_lse, col_lse)
        return reduce_pairs(per_pair, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        image, text, scale_value, bias_value, image_norms, text_norms, *saved = ctx.saved_tensors
        options = ctx.options
        want_scale, want_text = ctx.needs_input_grad[2], ctx.needs_input_grad[1]
        if ctx.distributed is not None:
            grad_image, grad_text, grad_scale = ctx.distributed.backward(
                image, text, scale_value, bias_value, saved, grad_output, want_scale, want_text)
        else:
            row_lse, col_lse = saved
            coef = 0.5 * pair_weights(grad_output, options.reduction, image.shape[0], row_lse.dtype)
            grad_image, grad_text, grad_scale = ctx.backend.op("clip_loss").clip_loss_bwd(
                image, text, scale_value, bias_value, row_lse, col_lse, coef, coef, 0, options.deterministic)
            grad_scale = grad_scale if want_scale else None
        grad_bias = None
        if grad_scale is not None:
            grad_scale = grad_scale.reshape(ctx.scale_meta[0]).to(ctx.scale_meta[1])
        if ctx.needs_input_grad[3]:
            grad_bias = torch.zeros(ctx.bias_meta[0], dtype=ctx.bias_meta[1], device=image.device)
        if options.normalize:
            grad_image = normalize_rows_backward(grad_image, image, image_norms)
            grad_text = normalize_rows_backward(grad_text, text, text_norms) if grad_text is not None else None
        grad_text = grad_text.to(text.dtype) if grad_text is not None else None
        return grad_image.to(image.dtype), grad_text, grad_scale, grad_bias, None, None, None
