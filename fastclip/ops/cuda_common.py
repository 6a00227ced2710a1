"""fastclip's CUDA extension (``fastclip._C``, built from csrc/) and what its two op files share.

    extension()                 torch.ops.fastclip_cuda, loading fastclip._C on first use; RuntimeError
                                with the build command when it is missing or does not load
    install_reasons()           why this install cannot use the extension (empty when it can)
    arch_reasons(capability)    why the built kernels cannot run on a GPU of that compute capability
    build_summary()             the archs, CUDA and torch the extension was built for
    allow_tf32(dtype)           FASTCLIP_FP32_PRECISION, read as the Triton backend reads it
    check_inputs(...)           dtype / shape / device errors that name the fix (fastclip.checks)

Nothing is loaded or queried at import. The launchers hand the extension
``fastclip.ops.workspace.POISON_BUFFERS`` (tests only: NaN-filled outputs and workspaces).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from fastclip.checks import check_kernel_inputs
from fastclip.cuda_toolkit import BUILD_COMMAND
from fastclip.devices import dot_precision

DEVICES = ("cuda",)


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
    """fp32 inputs use TF32 tensor cores on sm80+ unless FASTCLIP_FP32_PRECISION=ieee (fastclip.devices)."""
    return dtype == torch.float32 and dot_precision(dtype) == "tf32"


def check_inputs(image: torch.Tensor, text: torch.Tensor, *others: torch.Tensor) -> None:
    check_kernel_inputs("cuda", DEVICES, image, text, *others)
