"""Portable chunked PyTorch primitives of the SigLIP loss (the reference backend).

With S = scale * image @ text.T + bias over a block of rows (image, b x D) and columns (text, n x D),
and y_ij = +1 on the positive pairs j = i + positive_offset, -1 elsewhere:

    siglip_loss_fwd -> sum_ij softplus(-y_ij S_ij)  (= -sum log sigmoid(y S); 0-dim, fp32)
    siglip_loss_bwd -> with G_ij = grad_coef * (sigmoid(S_ij) - [pos])  (= d/dS of grad_coef * fwd):
                       grad_image = scale * G @ text, grad_text = scale * G.T @ image, grad_bias = sum G

Positives are evaluated as softplus(-S) and sigmoid(S) - 1 = -sigmoid(-S) directly, never as a
difference of two large terms. Equivalent plain PyTorch::

    S = scale * image @ text.T + bias
    y = -torch.ones_like(S); y[i, i + positive_offset] = 1
    loss_sum = -torch.nn.functional.logsigmoid(y * S).sum()
"""
from __future__ import annotations

import torch

from fastclip.devices import accumulate_dtype, gemm_dtype
from fastclip.ops.chunking import ChunkBuffers, feature_grads_of_chunk, positive_entries, scaled_logits_into
from fastclip.ops.output_shapes import gradients_like


@torch.library.custom_op("fastclip::siglip_loss_fwd_torch", mutates_args=())
def siglip_loss_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    positive_offset: int, deterministic: bool) -> torch.Tensor:
    n_rows, n_cols = image.shape[0], text.shape[0]
    accumulate = accumulate_dtype(image)
    scale, bias = scale.to(accumulate), bias.to(accumulate)
    image_gemm, text_gemm = image.to(gemm_dtype(image)), text.to(gemm_dtype(text))
    total = torch.zeros((), dtype=accumulate, device=image.device)
    buffers = ChunkBuffers(n_rows, n_cols, 2, accumulate, image.device)
    for start, stop, (logits, losses) in buffers.ranges():
        scaled_logits_into(logits, image_gemm[start:stop], text_gemm, scale).add_(bias)
        rows, cols = positive_entries(start, stop, n_cols, positive_offset, image.device)
        logits[rows, cols] = logits[rows, cols].neg()  # softplus(-y S): negate S on the positives
        total += torch._C._nn.softplus(logits, 1, 20, out=losses).sum()
    return total


@siglip_loss_fwd.register_fake
def _(image, text, scale, bias, positive_offset, deterministic):
    return image.new_empty((), dtype=accumulate_dtype(image))


@torch.library.custom_op("fastclip::siglip_loss_bwd_torch", mutates_args=())
def siglip_loss_bwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    positive_offset: int, grad_coef: torch.Tensor,
                    deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, n_cols = image.shape[0], text.shape[0]
    accumulate = accumulate_dtype(image)
    scale, bias, grad_coef = scale.to(accumulate), bias.to(accumulate), grad_coef.to(accumulate)
    image_gemm, text_gemm = image.to(gemm_dtype(image)), text.to(gemm_dtype(text))
    grad_image = torch.empty(image.shape, dtype=accumulate, device=image.device)
    grad_text = torch.zeros(text.shape, dtype=accumulate, device=image.device)
    grad_bias = torch.zeros((), dtype=accumulate, device=image.device)
    buffers = ChunkBuffers(n_rows, n_cols, 1, accumulate, image.device)
    for start, stop, (grad_logits,) in buffers.ranges():
        scaled_logits_into(grad_logits, image_gemm[start:stop], text_gemm, scale).add_(bias)
        rows, cols = positive_entries(start, stop, n_cols, positive_offset, image.device)
        positive_logits = grad_logits[rows, cols]
        grad_logits.sigmoid_()
        grad_logits[rows, cols] = -torch.sigmoid(-positive_logits)  # sigmoid(S) - 1, without cancellation
        grad_bias += grad_logits.sum()
        feature_grads_of_chunk(grad_logits, image_gemm[start:stop], text_gemm, grad_image[start:stop], grad_text)
    scale = scale * grad_coef  # G = grad_coef * (sigmoid(S) - [pos]): the coefficient goes on the outputs
    grad_bias = grad_bias * grad_coef
    return grad_image.mul_(scale), grad_text.mul_(scale), grad_bias


@siglip_loss_bwd.register_fake
def _(image, text, scale, bias, positive_offset, grad_coef, deterministic):
    return gradients_like(image, text, accumulate_dtype(image))
