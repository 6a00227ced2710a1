"""CUDA C++ primitives of the CLIP loss (csrc/clip_loss.cu): the signatures and semantics of clip_loss_torch.py.

With S = scale * image @ text.T + bias over a block of rows (image, b x D) and columns (text, n x D):

    clip_loss_fwd -> (row_lse (b,), col_lse (n,) partial over these rows, row_expect, col_expect)
    clip_loss_bwd -> (grad_image (b, D), grad_text (n, D), grad_scale ()), fp32, for
                     G_ij = row_coef_i (P_ij - [pos]) + col_coef_j (Q_ij - [pos]),  pos: j = i + positive_offset
                     grad_scale = sum_ij G_ij x_ij,  x = image @ text.T (the logit before scale and bias)

Equivalent plain PyTorch (materialising S, which this never does)::

    S = scale * image @ text.T + bias
    row_lse, col_lse = S.logsumexp(1), S.logsumexp(0)
    G = row_coef[:, None] * (S - row_lse[:, None]).exp() + col_coef * (S - col_lse).exp()  # minus positives
    grad_image, grad_text = scale * G @ text, scale * G.T @ image
    grad_scale = (G * (image @ text.T)).sum()

Forward: one kernel computes each 128 x 64 tile of S once (WMMA tensor cores from sm70: fp16 everywhere,
bf16 and TF32 from sm80; exact FMA for fp32 under FASTCLIP_FP32_PRECISION=ieee and for bf16 below sm80)
for both softmax directions; the partials are merged in a fixed order. Backward: per row chunk a kernel
writes G into the bounded workspace (FASTCLIP_WORKSPACE_MB), then two cuBLAS GEMMs with fp32
accumulation consume it. The same kernel sums G x per tile from its fp32 G (before G is rounded to the
workspace dtype) and the same tile products; the partials are summed in fp64 in a fixed order. That
keeps the logit_scale gradient's digits, which sum_i I_i . dI_i / scale would lose to the rounding of
dI (from a 16-bit G on the tensor-core paths) and the division. What remains is G's own error: where the
loss nears zero (P_ii -> 1), G's positives carry the rounding of the fp32 row/column LSE the forward
saves, as in every backend of this contract. Bitwise repeatable on every path; ``deterministic`` is
accepted for the common signature. The custom ops below wrap ``torch.ops.fastclip_cuda`` (csrc/binding.cpp)
and carry fake kernels, so torch.compile(fullgraph=True) traces them.
"""
from __future__ import annotations

import torch

from fastclip.ops import cuda_common as common
from fastclip.ops import workspace
from fastclip.ops.output_shapes import clip_stats_like, gradients_like


@torch.library.custom_op("fastclip::clip_loss_fwd_cuda", mutates_args=())
def clip_loss_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  with_expectations: bool,
                  deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """image: (b, D), text: (n, D) fp32/fp16/bf16 on one GPU; scale, bias: 0-dim -> four fp32 vectors."""
    common.check_inputs(image, text, scale, bias)
    return tuple(common.extension().clip_loss_fwd(image, text, scale, bias, with_expectations,
                                                  common.allow_tf32(image.dtype), workspace.workspace_bytes(),
                                                  workspace.POISON_BUFFERS))


@clip_loss_fwd.register_fake
def _(image, text, scale, bias, with_expectations, deterministic):
    return clip_stats_like(image, text, with_expectations, torch.float32)


@torch.library.custom_op("fastclip::clip_loss_bwd_cuda", mutates_args=())
def clip_loss_bwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  row_lse: torch.Tensor, col_lse: torch.Tensor, row_coef: torch.Tensor, col_coef: torch.Tensor,
                  positive_offset: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_image (b, D), grad_text (n, D), grad_scale ()) in fp32; row_*: (b,), col_*: (n,) fp32."""
    common.check_inputs(image, text, scale, bias, row_lse, col_lse, row_coef, col_coef)
    return tuple(common.extension().clip_loss_bwd(image, text, scale, bias, row_lse, col_lse, row_coef, col_coef,
                                                  positive_offset, common.allow_tf32(image.dtype),
                                                  workspace.workspace_bytes(), workspace.POISON_BUFFERS))


@clip_loss_bwd.register_fake
def _(image, text, scale, bias, row_lse, col_lse, row_coef, col_coef, positive_offset, deterministic):
    return gradients_like(image, text, torch.float32)
