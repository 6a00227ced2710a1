"""Triton launchers of the SigLIP loss primitives: the signatures and semantics of siglip_loss_torch.py.

With S = scale * image @ text.T + bias over a block of rows (image, b x D) and columns (text, n x D),
y_ij = +1 on the positives j = i + positive_offset and -1 elsewhere:

    siglip_loss_fwd -> sum_ij softplus(-y_ij S_ij)                                   (0-dim fp32)
    siglip_loss_bwd -> with G = grad_coef * (sigmoid(S) - [pos]):
                       (scale * G @ text, scale * G.T @ image, sum G)                  (fp32)

Equivalent plain PyTorch (materialising S, which this never does)::

    S = scale * image @ text.T + bias
    y = -torch.ones_like(S); y[i, i + positive_offset] = 1
    loss_sum = -torch.nn.functional.logsigmoid(y * S).sum()

Forward: one fused pass, one fp32 partial per program, summed in a fixed order. Backward: per row
chunk a kernel writes sigmoid(S) - [pos] (input dtype, bounded workspace) and its tile sums, then two
cuBLAS GEMMs consume it (kernels/siglip_loss.py). Bitwise repeatable; ``deterministic`` is accepted
for the common signature.
"""
from __future__ import annotations

import torch

from fastclip.kernels.siglip_loss import (SIGLIP_BWD_CONFIGS, SIGLIP_FWD_CONFIGS, _siglip_loss_bwd_kernel,
                                          _siglip_loss_fwd_kernel)
from fastclip.ops import triton_common as common
from fastclip.ops.output_shapes import gradients_like


def _forward(image, text, scale, bias, positive_offset: int, config) -> torch.Tensor:
    n_rows, dim = image.shape
    n_cols = text.shape[0]
    blocks = common.cdiv(n_rows, config.block_m)
    splits, tiles_per_split = common.column_splits(blocks, n_cols, config.block_n, image.device)
    partials = common.allocate((blocks * splits,), torch.float32, image.device)
    _siglip_loss_fwd_kernel[(blocks, splits)](
        image, text, scale, bias, partials, n_rows, n_cols, dim, positive_offset, tiles_per_split,
        image.stride(0), image.stride(1), text.stride(0), text.stride(1),
        **common.launch_options(config, image.dtype, dim))
    return partials.sum()


def _backward(image, text, scale, bias, positive_offset: int, grad_coef, config):
    n_cols, dim = text.shape
    headroom = common.FP16_HEADROOM if image.dtype == torch.float16 else 1.0
    multiplier = torch.full((), headroom, dtype=torch.float32, device=image.device)
    options = common.launch_options(config, image.dtype, dim)

    def write_chunk(start, rows, image_rows, grad_rows, tile_sums):
        _siglip_loss_bwd_kernel[(common.cdiv(rows, config.block_m), common.cdiv(n_cols, config.block_n))](
            image_rows, text, scale, bias, multiplier, grad_rows, tile_sums,
            rows, n_cols, dim, positive_offset + start,
            image_rows.stride(0), image_rows.stride(1), text.stride(0), text.stride(1), grad_rows.stride(0),
            **options)

    grad_image, grad_text, grad_sum = common.chunked_backward(image, text, config, write_chunk)
    grad_coef = grad_coef.float()
    undo = grad_coef * scale.float() / headroom
    return grad_image.mul_(undo), grad_text.mul_(undo), grad_sum * grad_coef


@torch.library.custom_op("fastclip::siglip_loss_fwd_triton", mutates_args=())
def siglip_loss_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    positive_offset: int, deterministic: bool) -> torch.Tensor:
    """image: (b, D), text: (n, D) fp32/fp16/bf16; scale, bias: 0-dim fp32 -> 0-dim fp32 loss sum."""
    common.check_inputs(image, text, scale, bias)
    config = common.choose_config("siglip_loss_fwd", SIGLIP_FWD_CONFIGS, image.device, common.shape_key(image, text),
                                  lambda cfg: _forward(image, text, scale, bias, positive_offset, cfg))
    return _forward(image, text, scale, bias, positive_offset, config)


@siglip_loss_fwd.register_fake
def _(image, text, scale, bias, positive_offset, deterministic):
    return image.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastclip::siglip_loss_bwd_triton", mutates_args=())
def siglip_loss_bwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    positive_offset: int, grad_coef: torch.Tensor,
                    deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_image (b, D), grad_text (n, D), grad_bias ()) in fp32; grad_coef: 0-dim (d loss / d loss_sum)."""
    common.check_inputs(image, text, scale, bias, grad_coef)
    config = common.choose_config(
        "siglip_loss_bwd", SIGLIP_BWD_CONFIGS, image.device, common.shape_key(image, text),
        lambda cfg: _backward(image, text, scale, bias, positive_offset, grad_coef, cfg))
    return _backward(image, text, scale, bias, positive_offset, grad_coef, config)


@siglip_loss_bwd.register_fake
def _(image, text, scale, bias, positive_offset, grad_coef, deterministic):
    return gradients_like(image, text, torch.float32)
