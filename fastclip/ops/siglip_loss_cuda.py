"""CUDA C++ primitives of the SigLIP loss (csrc/siglip_loss.cu): the signatures and semantics of siglip_loss_torch.py.

With S = scale * image @ text.T + bias over a block of rows (image, b x D) and columns (text, n x D),
y_ij = +1 on the positives j = i + positive_offset and -1 elsewhere:

    siglip_loss_fwd -> sum_ij softplus(-y_ij S_ij)                                   (0-dim fp32)
    siglip_loss_bwd -> with G = grad_coef * (sigmoid(S) - [pos]):
                       (scale * G @ text, scale * G.T @ image, sum G)                  (fp32)

Equivalent plain PyTorch (materialising S, which this never does)::

    S = scale * image @ text.T + bias
    y = -torch.ones_like(S); y[i, i + positive_offset] = 1
    loss_sum = -torch.nn.functional.logsigmoid(y * S).sum()

Forward: one fused pass over the tiles of S (the tile products of clip_loss_cuda.py), one fp32 partial
per thread block, summed in a fixed order. Backward: per row chunk a kernel writes sigmoid(S) - [pos]
into the bounded workspace with its per-tile sums, then two cuBLAS GEMMs consume it. Bitwise
repeatable; ``deterministic`` is accepted for the common signature.
"""
from __future__ import annotations

import torch

from fastclip.ops import cuda_common as common
from fastclip.ops import workspace
from fastclip.ops.output_shapes import gradients_like


@torch.library.custom_op("fastclip::siglip_loss_fwd_cuda", mutates_args=())
def siglip_loss_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    positive_offset: int, deterministic: bool) -> torch.Tensor:
    """image: (b, D), text: (n, D) fp32/fp16/bf16 on one GPU; scale, bias: 0-dim -> 0-dim fp32 loss sum."""
    common.check_inputs(image, text, scale, bias)
    return common.extension().siglip_loss_fwd(image, text, scale, bias, positive_offset,
                                              common.allow_tf32(image.dtype), workspace.POISON_BUFFERS)


@siglip_loss_fwd.register_fake
def _(image, text, scale, bias, positive_offset, deterministic):
    return image.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastclip::siglip_loss_bwd_cuda", mutates_args=())
def siglip_loss_bwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    positive_offset: int, grad_coef: torch.Tensor,
                    deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_image (b, D), grad_text (n, D), grad_bias ()) in fp32; grad_coef: 0-dim (d loss / d loss_sum)."""
    common.check_inputs(image, text, scale, bias, grad_coef)
    return tuple(common.extension().siglip_loss_bwd(image, text, scale, bias, positive_offset, grad_coef,
                                                    common.allow_tf32(image.dtype), workspace.workspace_bytes(),
                                                    workspace.POISON_BUFFERS))


@siglip_loss_bwd.register_fake
def _(image, text, scale, bias, positive_offset, grad_coef, deterministic):
    return gradients_like(image, text, torch.float32)
