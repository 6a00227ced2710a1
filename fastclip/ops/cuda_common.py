"""fastclip's CUDA extension (``fastclip._C``, built from csrc/) and what its two op files share.

    extension()                 torch.ops.fastclip_cuda, loading fastclip._C on first use; RuntimeError
                                with the build command when it is missing or does not load
    install_reasons()           why this install cannot use the extension (empty when it can)
    arch_reasons(capability)    why the built kernels cannot run on a GPU of that compute capability
    build_summary()             the archs, CUDA and torch the extension was built for
    allow_tf32(dtype)           FASTCLIP_FP32_PRECISION, read as the Triton backend reads it
    check_inputs(...)           dtype / shape / device errors that name the fix

Nothing is loaded or queried at import. ``POISON_BUFFERS`` (tests only) makes the launchers fill every
output and workspace with NaN first, so an element no kernel writes shows up.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from fastclip.ops import triton_common

BUILD_COMMAND = "FASTCLIP_BUILD_CUDA=1 pip install --no-build-isolation -e ."
POISON_BUFFERS = False


@functools.lru_cache(maxsize=None)
def _load() -> tuple:
    """(module or None, reason). Loaded once per process."""
    if importlib.util.find_spec("fastclip._C") is None:
        return None, f"the CUDA kernels are not built: {BUILD_COMMAND}"
    try:
        module = importlib.import_module("fastclip._C")
    except (ImportError, OSError) as error:
        return None, (f"the built CUDA kernels do not load with this torch ({error}): rebuild them, {BUILD_COMMAND}")
    return module, ""


def install_reasons() -> tuple:
    return () if _load()[0] is not None else (_load()[1],)


def extension():
    """The ops namespace of the extension (torch.ops.fastclip_cuda)."""
    if _load()[0] is None:
        raise RuntimeError(_load()[1])
    return torch.ops.fastclip_cuda


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """{"archs": [75, 80, 90], "ptx": 90 or None, "cuda": "13.0", "torch": "2.14.1"} of the loaded extension."""
    fields = dict(item.split("=", 1) for item in extension().build_info().split(";") if "=" in item)
    archs = [int(a) // 10 for a in fields.get("archs", "").split(",") if a.strip().isdigit()]
    ptx = fields.get("ptx", "")
    return {"archs": archs, "ptx": int(ptx) // 10 if ptx.isdigit() else None, "cuda": fields.get("cuda", "?"),
            "torch": fields.get("torch", "?")}


def _sm(number: int) -> str:
    return f"sm{number}"


def build_summary() -> str:
    info = build_info()
    archs = ", ".join(_sm(a) for a in info["archs"]) or "unknown archs"
    ptx = f" (+PTX for {_sm(info['ptx'])} and newer)" if info["ptx"] else ""
    return f"built for {archs}{ptx} with CUDA {info['cuda']}, torch {info['torch']}"


def arch_reasons(capability: tuple[int, int]) -> tuple:
    """Why the extension's kernels cannot run on a GPU of compute capability ``capability``.

    A cubin for sm_XY runs on GPUs X.Z with Z >= Y; embedded PTX for sm_P runs (JIT-compiled) on any
    GPU >= P. The kernels need sm70 (fp16 tensor cores) or newer.
    """
    major, minor = capability
    number = 10 * major + minor
    if number < 70:
        return (f"needs compute capability >= sm70 (tensor cores), this GPU is {_sm(number)}",)
    info = build_info()
    runs = any(a // 10 == major and a % 10 <= minor for a in info["archs"]) or (
        info["ptx"] is not None and info["ptx"] <= number)
    if runs:
        return ()
    toolkit = " (sm70 needs a CUDA 12.x or older toolkit: CUDA_HOME=/path/to/cuda-12)" if number == 70 else ""
    return (f"the CUDA kernels are {build_summary()}, not for this GPU ({_sm(number)}): rebuild them with "
            f"TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" {BUILD_COMMAND}{toolkit}",)


def allow_tf32(dtype: torch.dtype) -> bool:
    """fp32 inputs use TF32 tensor cores on sm80+ unless FASTCLIP_FP32_PRECISION=ieee (triton_common reads it)."""
    return dtype == torch.float32 and triton_common.dot_precision(dtype) == "tf32"


def check_inputs(image: torch.Tensor, text: torch.Tensor, *others: torch.Tensor) -> None:
    if image.dtype not in (torch.float32, torch.float16, torch.bfloat16) or text.dtype != image.dtype:
        raise TypeError(f"the cuda backend takes float32/float16/bfloat16 features of one dtype, got {image.dtype} "
                        f"and {text.dtype}: cast them, or use backend='torch'")
    if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1] or image.shape[1] == 0:
        raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must be (b, D) and (n, D), D >= 1")
    if image.shape[0] == 0 or text.shape[0] == 0:
        raise ValueError("the cuda backend needs at least one image row and one text row")
    for tensor in (image, text, *others):
        if tensor.device.type != "cuda" or tensor.device != image.device:
            raise ValueError(f"the cuda backend runs on one CUDA device; got tensors on {image.device} and "
                             f"{tensor.device}: move them to the same GPU")
