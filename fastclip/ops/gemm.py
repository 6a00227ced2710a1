"""GEMMs that write fp32 from 16-bit operands, and the one cache of where torch cannot do that.

torch >= 2.8 takes ``out_dtype=torch.float32`` on mm / addmm / bmm of 16-bit CUDA operands: cuBLAS sums
the fp32 products and writes fp32, with no (rows, D) transient. Older torch, or a cuBLAS kind without
that kernel, raises; the first call of each kind is the probe, and a failure is remembered in
``_FP32_OUT_FAILED`` so it is tried once per process. Everything else takes the plain 16-bit GEMM
and upcasts.
"""
from __future__ import annotations

import torch

_FP32_OUT_FAILED: set = set()  # keys (op, kind) where a torch GEMM with out_dtype=float32 raised once


def gemm_kind(left: torch.Tensor, right: torch.Tensor) -> tuple:
    """(device index, dtype, layout of each operand): cuBLAS picks a different kernel for a transposed
    operand (G.T @ I) than for a plain one (G @ T), so one failing must not switch off the other."""
    def layout(tensor):
        return "T" if tensor.stride(0) == 1 and tensor.stride(1) != 1 else "N"
    return left.device.index, left.dtype, layout(left), layout(right)


def fp32_out_or(aten_op, key: tuple, operand: torch.Tensor, fast, fallback):
    """fast() (a torch GEMM with out_dtype=float32) where ``aten_op`` has that overload, ``operand`` is on
    a GPU and ``key`` did not raise before; else fallback()."""
    if operand.device.type == "cuda" and hasattr(aten_op, "dtype") and key not in _FP32_OUT_FAILED:
        try:
            return fast()
        except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
            _FP32_OUT_FAILED.add(key)
    return fallback()


def matmul_fp32(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right as fp32, accumulated in fp32 (older torch: a 16-bit product, upcast)."""
    if left.dtype == torch.float32:
        return torch.mm(left, right)
    return fp32_out_or(torch.ops.aten.mm, ("mm", gemm_kind(left, right)), left,
                       lambda: torch.mm(left, right, out_dtype=torch.float32), lambda: torch.mm(left, right).float())


def mm_fp32_into(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """out (fp32) = left @ right, written by the GEMM itself where torch allows (no transient)."""
    if left.dtype == out.dtype:
        return torch.mm(left, right, out=out)
    return fp32_out_or(torch.ops.aten.mm, ("mm_out", gemm_kind(left, right)), left,
                       lambda: torch.mm(left, right, out_dtype=out.dtype, out=out),
                       lambda: out.copy_(matmul_fp32(left, right)))


def addmm_fp32_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """out (fp32) += left @ right inside the GEMM (cuBLAS beta = 1 on the fp32 out, out_dtype for 16-bit
    operands where torch allows): no (rows, D) fp32 transient. Otherwise one fp32 product is added."""
    if left.dtype == out.dtype:
        return out.addmm_(left, right)
    return fp32_out_or(torch.ops.aten.mm, ("addmm", gemm_kind(left, right)), left,
                       lambda: torch.addmm(out, left, right, out_dtype=out.dtype, out=out),
                       lambda: out.add_(matmul_fp32(left, right)))


def batched_row_dots_fp32(left: torch.Tensor, right: torch.Tensor):
    """(left_i . right_i) as one batched GEMV with an fp32 output, or None where torch cannot."""
    return fp32_out_or(torch.ops.aten.bmm, ("bmm", left.dtype), left,
                       lambda: torch.bmm(left[:, None, :], right[:, :, None], out_dtype=torch.float32).reshape(-1),
                       lambda: None)
