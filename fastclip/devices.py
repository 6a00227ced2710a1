"""Facts about devices and dtypes that the loss layers share: a leaf module (it imports only torch).

    FLOAT_DTYPES              what the loss API and the torch backend take (fp64 for gradcheck)
    KERNEL_DTYPES             what the fused kernels (triton, cuda) take
    accumulate_dtype(t)       fp32, or fp64 for fp64 inputs: every softmax / sigmoid statistic
    gemm_dtype(t)             the dtype a GEMM on t runs in: its own on accelerators, fp32-or-fp64 on CPU
    device_capability(dev)    (major, minor) of a CUDA device, read once and cached
    triton_interpret_mode()   TRITON_INTERPRET is set: Triton kernels run on CPU tensors
    dot_precision(dtype)      FASTCLIP_FP32_PRECISION for fp32 operands ("tf32" | "ieee")

Everything is read at call time: nothing here touches a GPU or the environment at import.
"""
from __future__ import annotations

import functools
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_PRECISION_ENV = "FASTCLIP_FP32_PRECISION"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def accumulate_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Softmax / sigmoid statistics are always accumulated in fp32 (fp64 for fp64 inputs, for gradcheck)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def gemm_dtype(tensor: torch.Tensor) -> torch.dtype:
    """GEMMs run in the input dtype on accelerators (tensor cores) and in fp32 on CPU (fast and exact)."""
    if tensor.device.type == "cpu":
        return accumulate_dtype(tensor)
    return tensor.dtype


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    properties = torch.cuda.get_device_properties(index)
    return properties.major, properties.minor


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device, read once per device and cached."""
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


def triton_interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """How fused dots treat fp32 operands: FASTCLIP_FP32_PRECISION = tf32 (default) | ieee.

    TF32 tensor cores (10-bit mantissa products, ~8x faster) or exact fp32 FMA. Only fp32 operands are
    affected; 16-bit dots are always exact products, reported as "tf32" (the kernels' default).
    """
    if dtype != torch.float32:
        return "tf32"
    raw = os.environ.get(FP32_PRECISION_ENV, "tf32").strip().lower() or "tf32"
    if raw not in ("tf32", "ieee"):
        raise ValueError(f"{FP32_PRECISION_ENV}={raw!r} is not a choice: set it to 'tf32' (fast, default) "
                         "or 'ieee' (exact fp32 products)")
    return raw
