"""The SigLIP loss as one autograd Function over any backend's primitives, never materialising B x B.

    L = -sum_ij log sigmoid(y_ij S_ij) / B,   S = scale * I @ T.T + bias,  y = +1 on i = j, -1 elsewhere

(open_clip's ``SigLipLoss``: the sum over the local image rows against the texts, divided by the
local batch). Backward, with G_ij = (sigmoid(S_ij) - [i=j]) / B:

    dI = scale * G @ T,  dT = scale * G.T @ I,  dscale = sum_i I_i . dI_i / scale,  dbias = sum_ij G_ij

Saved for backward: the inputs only (with ``normalize``, the normalised inputs and their O(B) norms,
as the CLIP loss does). Equivalent plain PyTorch (materialising S)::

    S = scale * I @ T.T + bias; y = 2 * torch.eye(B) - 1
    loss = -torch.nn.functional.logsigmoid(y * S).sum() / B

Across ranks (``distributed`` set, see ``fastclip.distributed``) the rows stay local and the columns
are every rank's texts (positives only in the rank's own block, as open_clip's exchange does): the
same division by the local batch, the same scale and bias gradients from the local rows, and the
text gradients routed back to the ranks that own the texts.
"""
from __future__ import annotations

import torch

from fastclip.backends import LossBackend
from fastclip.devices import accumulate_dtype
from fastclip.ops.normalize import normalize_rows, normalize_rows_backward
from fastclip.ops.options import SigLipOptions

DEFAULT_OPTIONS = SigLipOptions()


def scale_grad_from_rows(image: torch.Tensor, grad_image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """sum_ij G_ij x_ij over these rows = sum_i I_i . dI_i / scale (dI = scale * G @ T)."""
    return (image.to(grad_image.dtype) * grad_image).sum() / scale


class SigLipLossFunction(torch.autograd.Function):
    """apply(image, text, scale, bias, backend, options=SigLipOptions(), exchange=None) -> the loss.

    image, text: (b, D); scale, bias: one-element tensors; backend: the ``LossBackend`` whose
    primitives run; options: the call's ``SigLipOptions`` (normalize and deterministic are read
    here); exchange: None for one process, else the ``fastclip.distributed.exchange`` exchange that
    brings every rank's texts to these rows (``siglip_sum`` / ``siglip_gradients``). Backward returns
    one gradient per tensor input and None for the other three.
    """

    @staticmethod
    def forward(ctx, image, text, scale, bias, backend: LossBackend, options: SigLipOptions = DEFAULT_OPTIONS,
                exchange=None):
        image_norms = text_norms = None
        if options.normalize:
            image, image_norms = normalize_rows(image)
            text, text_norms = normalize_rows(text)
        scale_value = scale.detach().reshape(()).to(accumulate_dtype(image))
        bias_value = bias.detach().reshape(()).to(accumulate_dtype(image))
        if exchange is None:
            op = backend.op("siglip_loss")
            loss_sum, saved = op.siglip_loss_fwd(image, text, scale_value, bias_value, 0, options.deterministic), ()
        else:
            loss_sum, saved = exchange.siglip_sum(image, text, scale_value, bias_value)
        ctx.save_for_backward(image, text, scale_value, bias_value, image_norms, text_norms, *saved)
        ctx.backend, ctx.options, ctx.exchange = backend, options, exchange
        ctx.scale_meta, ctx.bias_meta = (scale.shape, scale.dtype), (bias.shape, bias.dtype)
        return loss_sum / image.shape[0]

    @staticmethod
    def backward(ctx, grad_output):
        image, text, scale_value, bias_value, image_norms, text_norms, *saved = ctx.saved_tensors
        grad_coef = grad_output.reshape(()).to(accumulate_dtype(image)) / image.shape[0]
        if ctx.exchange is None:
            grad_image, grad_text, grad_bias = ctx.backend.op("siglip_loss").siglip_loss_bwd(
                image, text, scale_value, bias_value, 0, grad_coef, ctx.options.deterministic)
        else:
            grad_image, grad_text, grad_bias = ctx.exchange.siglip_gradients(
                image, text, scale_value, bias_value, saved, grad_coef, ctx.needs_input_grad[1])
        grad_scale = None
        if ctx.needs_input_grad[2]:  # from the (normalised) rows the loss saw, before the normalisation's map
            grad_scale = scale_grad_from_rows(image, grad_image, scale_value)
            grad_scale = grad_scale.reshape(ctx.scale_meta[0]).to(ctx.scale_meta[1])
        grad_bias = grad_bias.reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1]) if ctx.needs_input_grad[3] else None
        if ctx.options.normalize:
            grad_image = normalize_rows_backward(grad_image, image, image_norms)
            grad_text = normalize_rows_backward(grad_text, text, text_norms) if grad_text is not None else None
        grad_text = grad_text.to(text.dtype) if grad_text is not None else None
        return grad_image.to(image.dtype), grad_text, grad_scale, grad_bias, None, None, None
