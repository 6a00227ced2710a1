"""Loss backends and dispatch from declared capabilities (the xformers ``not_supported_reasons`` pattern).

``BACKENDS`` is the table: each backend is a small object that declares what it can run (device kinds,
minimum CUDA compute capability, dtypes, determinism) and names its op modules by import in its
loader (``_torch_ops``, ``_triton_ops``, ``_cuda_ops``): ``backend.op("clip_loss")`` is
``fastclip/ops/clip_loss_<backend>.py``. What those primitives take and return, ``grad_scale``
included, is written once in ``fastclip/ops/__init__.py``.

``backend="auto"`` walks ``AUTO_PRIORITY`` and takes the first backend with no reason against it; a
backend asked for by name that cannot run raises one ``ValueError`` listing every reason and its fix.
Nothing here touches the GPU at import time, and an op module is imported on first use (the triton
one needs triton, the cuda one loads nothing until called).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import torch

from fastclip.devices import FLOAT_DTYPES, KERNEL_DTYPES, device_capability, dtype_name, triton_interpret_mode

BACKEND_NAMES = ("auto", "torch", "triton", "cuda")


@dataclass(frozen=True)
class LossInputs:
    """What dispatch needs to know about a call."""

    device: torch.device
    dtype: torch.dtype
    deterministic: bool = False


@dataclass(frozen=True)
class LossBackend:
    name: str
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    min_compute_capability: tuple[int, int] | None = None
    max_compute_capability: tuple[int, int] | None = None
    deterministic: bool = True
    description: str = ""
    extra_checks: tuple = field(default=())  # callables (LossInputs) -> list[str]
    load_ops: Callable[[], dict[str, ModuleType]] | None = field(default=None, compare=False)

    def not_supported_reasons(self, inputs: LossInputs) -> list[str]:
        reasons: list[str] = []
        for check in self.extra_checks:
            reasons += check(inputs)
        if inputs.device.type not in self.device_types:
            reasons.append(f"runs on {'/'.join(self.device_types)} tensors, got {inputs.device.type}")
        if inputs.dtype not in self.dtypes:
            names = ", ".join(dtype_name(d) for d in self.dtypes)
            reasons.append(f"supports dtypes {names}, got {dtype_name(inputs.dtype)}")
        if inputs.deterministic and not self.deterministic:
            reasons.append("is not deterministic: pass deterministic=False or use backend='torch'")
        if inputs.device.type == "cuda" and (self.min_compute_capability or self.max_compute_capability):
            capability = device_capability(inputs.device)
            if self.min_compute_capability and capability < self.min_compute_capability:
                reasons.append(f"needs compute capability >= sm{''.join(map(str, self.min_compute_capability))},"
                               f" this GPU is sm{''.join(map(str, capability))}")
            if self.max_compute_capability and capability > self.max_compute_capability:
                reasons.append(f"is tuned for <= sm{''.join(map(str, self.max_compute_capability))} "
                               "(a faster backend fits this GPU)")
        return reasons

    def op(self, op_name: str) -> ModuleType:
        """The op module of this backend (``clip_loss`` or ``siglip_loss``): ``<op_name>_fwd`` / ``_bwd``.

        Loaded once through ``load_ops``; select_backend loads the modules of the backend it picks,
        outside any torch.compile graph, so a compiled graph only reads ``_LOADED_OPS``.
        """
        modules = _LOADED_OPS.get(self.name)
        if modules is None:
            modules = _LOADED_OPS[self.name] = self.load_ops()
        return modules[op_name]

    def import_ops(self) -> None:
        self.op("clip_loss")


_LOADED_OPS: dict[str, dict[str, ModuleType]] = {}


def _torch_ops() -> dict[str, ModuleType]:
    from fastclip.ops import clip_loss_torch, siglip_loss_torch

    return {"clip_loss": clip_loss_torch, "siglip_loss": siglip_loss_torch}


def _triton_ops() -> dict[str, ModuleType]:
    from fastclip.ops import clip_loss_triton, siglip_loss_triton  # imports triton and fastclip.kernels

    return {"clip_loss": clip_loss_triton, "siglip_loss": siglip_loss_triton}


def _cuda_ops() -> dict[str, ModuleType]:
    from fastclip.ops import clip_loss_cuda, siglip_loss_cuda  # fastclip._C loads on the first call

    return {"clip_loss": clip_loss_cuda, "siglip_loss": siglip_loss_cuda}


@torch.compiler.assume_constant_result
def _triton_install_reasons() -> tuple:
    """Why this install cannot run the Triton kernels (empty when it can). Fixed for the process, so
    torch.compile runs it once at trace time instead of breaking the graph on the imports."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return ("triton is not installed: pip install triton (Linux x86_64/aarch64)",)
    if importlib.util.find_spec("fastclip.kernels.clip_loss") is None:
        return ("this fastclip build has no Triton kernels (kernels/clip_loss.py)",)
    return ()


def _triton_checks(inputs: LossInputs) -> list[str]:
    reasons = list(_triton_install_reasons())
    if not reasons and inputs.device.type == "cpu" and not triton_interpret_mode():
        reasons.append("runs on CPU tensors only in the interpreter: set TRITON_INTERPRET=1 before importing triton")
    return reasons


@torch.compiler.assume_constant_result
def _cuda_install_reasons() -> tuple:
    """Why this install cannot run the CUDA C++ kernels (fastclip._C), fixed for the process."""
    from fastclip.ops.cuda_common import install_reasons  # loads the extension on first use, never at import

    return install_reasons()


@torch.compiler.assume_constant_result
def _cuda_arch_reasons(major: int, minor: int) -> tuple:
    from fastclip.ops.cuda_common import arch_reasons

    return arch_reasons((major, minor))


def _cuda_extension_checks(inputs: LossInputs) -> list[str]:
    reasons = list(_cuda_install_reasons())
    if not reasons and inputs.device.type == "cuda":
        capability = device_capability(inputs.device)
        if capability >= (7, 0):  # older GPUs get the min_compute_capability reason
            reasons += _cuda_arch_reasons(*capability)
    return reasons


BACKENDS: dict[str, LossBackend] = {
    "cuda": LossBackend(
        name="cuda", device_types=("cuda",),
        dtypes=KERNEL_DTYPES, min_compute_capability=(7, 0), deterministic=True,
        description="CUDA C++ kernels for sm70+ (auto picks them on V100/T4, triton first on sm80+)",
        extra_checks=(_cuda_extension_checks,), load_ops=_cuda_ops),
    "triton": LossBackend(
        name="triton", device_types=("cuda", "cpu"),
        dtypes=KERNEL_DTYPES, min_compute_capability=(8, 0), deterministic=True,
        description="fused Triton kernels for sm80+ (CPU under TRITON_INTERPRET=1)",
        extra_checks=(_triton_checks,), load_ops=_triton_ops),
    "torch": LossBackend(
        name="torch", device_types=("cpu", "cuda", "mps", "xpu", "meta"),
        dtypes=FLOAT_DTYPES, deterministic=True,
        description="portable chunked PyTorch (the reference backend)", load_ops=_torch_ops),
}

# triton needs sm80, so auto takes cuda on sm70-sm7x and triton on sm80+; cuda by name runs on any sm70+.
AUTO_PRIORITY = ("triton", "cuda", "torch")


def select_backend(name: str, inputs: LossInputs) -> LossBackend:
    """Return the backend for ``name`` ("auto" walks AUTO_PRIORITY); ValueError lists why not.

    Under torch.compile the choice is made once, at trace time, outside the graph (it depends only
    on the device, the dtype and this install), so dispatch never breaks a ``fullgraph=True`` graph.
    """
    return BACKENDS[_selected_name(name, inputs.device, inputs.dtype, inputs.deterministic)]


@torch.compiler.assume_constant_result
def _selected_name(name: str, device: torch.device, dtype: torch.dtype, deterministic: bool) -> str:
    chosen = _select_name(name, LossInputs(device, dtype, deterministic))
    BACKENDS[chosen].import_ops()  # so that a compiled graph finds them in _LOADED_OPS
    return chosen


def _select_name(name: str, inputs: LossInputs) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend={name!r} is unknown: choose one of {', '.join(BACKEND_NAMES)}")
    if name != "auto":
        reasons = BACKENDS[name].not_supported_reasons(inputs)
        if reasons:
            raise ValueError(f"backend={name!r} cannot run this call:\n  - " + "\n  - ".join(reasons)
                             + "\nUse backend='auto' to pick one that can, or fix the reasons above.")
        return name
    for candidate in AUTO_PRIORITY:
        if candidate == "triton" and inputs.device.type == "cpu":
            continue  # the interpreter is for tests; auto never picks it for real CPU work
        if not BACKENDS[candidate].not_supported_reasons(inputs):
            return candidate
    reasons = {n: BACKENDS[n].not_supported_reasons(inputs) for n in AUTO_PRIORITY}
    details = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in reasons.items())
    raise ValueError(f"no loss backend can run on {inputs.device} with {inputs.dtype}:\n{details}")
