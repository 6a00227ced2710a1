"""The CLIP loss as one autograd Function over any backend's primitives, never materialising B x B.

    L = 1/2 [ mean_i CE(S_i,:, i) + mean_j CE(S_:,j, j) ],   S = scale * I @ T.T + bias

Per pair i: loss_i = 1/2 [(row_lse_i - S_ii) + (col_lse_i - S_ii)], so the forward needs only the
row and column log-sum-exp (O(B), from one pass over S) and the diagonal. ``reduction`` is "mean"
(the drop-in value), "sum", or "none" (the (B,) per-pair vector).

Backward, with g_i = dL/dloss_i and P/Q the row/column softmax of S:

    dL/dS_ij = g_i/2 (P_ij - [i=j]) + g_j/2 (Q_ij - [i=j])        (the backend's G, recomputed in chunks)
    dI = scale * G @ T,  dT = scale * G.T @ I
    dscale = sum_ij G_ij (I_i . T_j) = sum_i I_i . dI_i / scale   (no extra pass)
    dbias = sum_ij G_ij = 0 exactly (each softmax sums to one: a shared bias cancels in CE)

Saved for backward: the (normalised) inputs, the O(B) row/column log-sum-exp and, with
``normalize=True``, the O(B) norms. Equivalent plain PyTorch (materialising S)::

    S = scale * I @ T.T + bias; labels = torch.arange(B)
    loss = (F.cross_entropy(S, labels) + F.cross_entropy(S.T, labels)) / 2
"""
from __future__ import annotations

import torch

from fastclip.backends import LossBackend
from fastclip.ops.chunking import accumulate_dtype
from fastclip.ops.normalize import normalize_rows, normalize_rows_backward

REDUCTIONS = ("mean", "sum", "none")


class ClipLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, backend: LossBackend, normalize: bool, reduction: str,
                deterministic: bool = False):
        op = backend.op("clip_loss")
        image_norms = text_norms = None
        if normalize:
            image, image_norms = normalize_rows(image)
            text, text_norms = normalize_rows(text)
        scale_value = scale.detach().reshape(()).to(accumulate_dtype(image))
        # A shared bias cancels exactly in both cross-entropies, so it never enters the computation
        # (adding and removing it would only cost fp32 rounding on large logits).
        bias_value = torch.zeros((), dtype=scale_value.dtype, device=image.device)
        row_lse, col_lse, _, _ = op.clip_loss_fwd(image, text, scale_value, bias_value, False, deterministic)
        accumulate = row_lse.dtype
        diagonal = (image.to(accumulate) * text.to(accumulate)).sum(dim=-1) * scale_value
        per_pair = 0.5 * ((row_lse - diagonal) + (col_lse - diagonal))
        ctx.save_for_backward(image, text, scale_value, bias_value, row_lse, col_lse, image_norms, text_norms)
        ctx.backend, ctx.normalize, ctx.reduction, ctx.deterministic = backend, normalize, reduction, deterministic
        ctx.scale_meta = (scale.shape, scale.dtype)
        ctx.bias_meta = (bias.shape, bias.dtype)
        if reduction == "mean":
            return per_pair.mean()
        if reduction == "sum":
            return per_pair.sum()
        return per_pair

    @staticmethod
    def backward(ctx, grad_output):
        image, text, scale_value, bias_value, row_lse, col_lse, image_norms, text_norms = ctx.saved_tensors
        n = image.shape[0]
        grad_per_pair = grad_output.to(row_lse.dtype).expand(n) if ctx.reduction != "none" else grad_output.to(row_lse.dtype)
        if ctx.reduction == "mean":
            grad_per_pair = grad_per_pair / n
        coef = 0.5 * grad_per_pair
        op = ctx.backend.op("clip_loss")
        grad_image, grad_text = op.clip_loss_bwd(image, text, scale_value, bias_value, row_lse, col_lse,
                                                 coef, coef, 0, ctx.deterministic)
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_scale = (image.to(grad_image.dtype) * grad_image).sum() / scale_value
            grad_scale = grad_scale.reshape(ctx.scale_meta[0]).to(ctx.scale_meta[1])
        if ctx.needs_input_grad[3]:
            grad_bias = torch.zeros(ctx.bias_meta[0], dtype=ctx.bias_meta[1], device=image.device)
        if ctx.normalize:
            grad_image = normalize_rows_backward(grad_image, image, image_norms)
            grad_text = normalize_rows_backward(grad_text, text, text_norms)
        return (grad_image.to(image.dtype), grad_text.to(text.dtype), grad_scale, grad_bias, None, None, None, None)
