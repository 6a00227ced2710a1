"""CUDA C++ primitives of the CLIP loss (csrc/clip_loss.cu): the signatures and semantics of clip_loss_torch.py.

With S = scale * image @ text.T + bias over a block of rows (image, b x D) and columns (text, n x D):

    clip_loss_fwd -> (row_lse (b,), col_lse (n,) partial over these rows, row_expect, col_expect)
    clip_loss_bwd -> (grad_image (b, D), grad_text (n, D)), fp32, for
                     G_ij = row_coef_i (P_ij - [pos]) + col_coef_j (Q_ij - [pos]),  pos: j = i + positive_offset

Equivalent plain PyTorch (materialising S, which this never does)::

    S = scale * image @ text.T + bias
    row_lse, col_lse = S.logsumexp(1), S.logsumexp(0)
    G = row_coef[:, None] * (S - row_lse[:, None]).exp() + col_coef * (S - col_lse).exp()  # minus positives
    grad_image, grad_text = scale * G @ text, scale * G.T @ image

Forward: one kernel computes each 128 x 64 tile of S once (WMMA tensor cores from sm70: fp16 everywhere,
bf16 and TF32 from sm80; exact FMA for fp32 under FASTCLIP_FP32_PRECISION=ieee and for bf16 below sm80)
for both softmax directions; the partials are merged in a fixed order. Backward: per row chunk a kernel
writes G into the bounded workspace (FASTCLIP_WORKSPACE_MB), then two cuBLAS GEMMs with fp32
accumulation consume it. Bitwise repeatable on every path; ``deterministic`` is accepted for the
common signature. The custom ops below wrap ``torch.ops.fastclip_cuda`` (csrc/binding.cpp) and carry
fake kernels, so torch.compile(fullgraph=True) traces them.
"""
from __future__ import annotations

import torch

from fastclip.ops import cuda_common as common
from fastclip.ops.workspace import workspace_bytes


@torch.library.custom_op("fastclip::clip_loss_fwd_cuda", mutates_args=())
def clip_loss_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  with_expectations: bool,
                  deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """image: (b, D), text: (n, D) fp32/fp16/bf16 on one GPU; scale, bias: 0-dim -> four fp32 vectors."""
    common.check_inputs(image, text, scale, bias)
    return tuple(common.extension().clip_loss_fwd(image, text, scale, bias, with_expectations,
                                                  common.allow_tf32(image.dtype), workspace_bytes(),
                                                  common.POISON_BUFFERS))


@clip_loss_fwd.register_fake
def _(image, text, scale, bias, with_expectations, deterministic):
    n_rows, n_cols = image.shape[0], text.shape[0]
    expect = (n_rows, n_cols) if with_expectations else (0, 0)
    fp32 = torch.float32
    return (image.new_empty(n_rows, dtype=fp32), image.new_empty(n_cols, dtype=fp32),
            image.new_empty(expect[0], dtype=fp32), image.new_empty(expect[1], dtype=fp32))


@torch.library.custom_op("fastclip::clip_loss_bwd_cuda", mutates_args=())
def clip_loss_bwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  row_lse: torch.Tensor, col_lse: torch.Tensor, row_coef: torch.Tensor, col_coef: torch.Tensor,
                  positive_offset: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_image (b, D), grad_text (n, D)) in fp32; row_*: (b,), col_*: (n,) fp32."""
    common.check_inputs(image, text, scale, bias, row_lse, col_lse, row_coef, col_coef)
    return tuple(common.extension().clip_loss_bwd(image, text, scale, bias, row_lse, col_lse, row_coef, col_coef,
                                                  positive_offset, common.allow_tf32(image.dtype), workspace_bytes(),
                                                  common.POISON_BUFFERS))


@clip_loss_bwd.register_fake
def _(image, text, scale, bias, row_lse, col_lse, row_coef, col_coef, positive_offset, deterministic):
    return image.new_empty(image.shape, dtype=torch.float32), text.new_empty(text.shape, dtype=torch.float32)
