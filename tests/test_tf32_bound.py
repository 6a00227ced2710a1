"""The documented error bound of fp32 features on Triton's TF32 dots, emulated on CPU.

Triton's tf32 tl.dot truncates each fp32 operand to TF32's 10 mantissa bits (its PTX has no cvt.rna),
so a logit x = I_i . T_j of unit vectors is off by at most 2 * 2^-10 * sum_k |I_ik T_jk| <= 2^-9, and
every logit-sum-exp by at most logit_scale * 2^-9 (fastclip.ops.triton_common, FASTCLIP_FP32_PRECISION;
docs/gpu.md gives the measured errors). The interpreter computes exact fp32 products, so the
truncation is emulated here on the operands' bits, next to round-to-nearest for comparison.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastclip.ops.triton_common import TF32_LSE_BOUND_PER_SCALE

SCALES = (10.0, 30.0, 100.0)


def tf32_truncated(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 by dropping the 13 low mantissa bits (what the tensor cores see from Triton)."""
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)


def tf32_rounded(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 rounded to nearest, ties away from zero (PTX cvt.rna.tf32.f32)."""
    bits = x.view(torch.int32)
    magnitude = ((bits & 0x7FFFFFFF) + 0x1000) & 0x7FFFE000
    return (magnitude | (bits & -0x80000000)).view(torch.float32)


def row_lse_errors(dim: int, seed: int) -> dict:
    """{scale: (truncated error, rounded error)}: max |row_lse - fp64 truth| of unit-norm CLIP-like pairs."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(300, dim, generator=generator), dim=-1)
    text = F.normalize(image + 0.5 * torch.randn(300, dim, generator=generator), dim=-1)
    exact = image.double() @ text.double().T
    truncated = tf32_truncated(image).double() @ tf32_truncated(text).double().T
    rounded = tf32_rounded(image).double() @ tf32_rounded(text).double().T
    errors = {}
    for scale in SCALES:
        truth = (scale * exact).logsumexp(1)
        errors[scale] = tuple(((scale * x).logsumexp(1) - truth).abs().max().item() for x in (truncated, rounded))
    return errors


def test_the_emulation_truncates_and_rounds():
    x = torch.tensor([1 + 2**-11 + 2**-13, -(1 + 2**-11), 1 + 2**-12], dtype=torch.float32)
    assert tf32_truncated(x).tolist() == [1.0, -1.0, 1.0]
    assert tf32_rounded(x).tolist() == [1 + 2**-10, -(1 + 2**-10), 1.0]


@pytest.mark.parametrize("dim,seed", [(512, 0), (768, 1), (200, 2)])
def test_tf32_logsumexp_error_stays_under_the_stated_bound_as_the_scale_grows(dim, seed):
    errors = row_lse_errors(dim, seed)
    for scale, (truncated, rounded) in errors.items():
        assert truncated <= TF32_LSE_BOUND_PER_SCALE * scale, (dim, seed, scale, truncated)
        assert rounded <= TF32_LSE_BOUND_PER_SCALE / 2 * scale, (dim, seed, scale, rounded)
    truncated_by_scale = [errors[scale][0] for scale in SCALES]
    assert truncated_by_scale == sorted(truncated_by_scale), f"seed {seed}: error does not grow with the scale"
    assert errors[100.0][0] > 3 * errors[100.0][1], f"seed {seed}: truncation should cost more than rounding"
