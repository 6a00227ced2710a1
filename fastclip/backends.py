"""Loss backends and dispatch from declared capabilities (the xformers ``not_supported_reasons`` pattern).

Each backend is a small object that declares what it can run (device kinds, minimum CUDA compute
capability, dtypes, determinism); its primitives live in ``fastclip/ops/<op>_<backend>.py``, each a
``torch.library`` custom op with a fake kernel, with exactly these signatures:

    clip_loss_fwd(image, text, scale, bias, with_expectations: bool, deterministic: bool)
        -> (row_lse (b,), col_lse (n,), row_expect (b,) or (0,), col_expect (n,) or (0,))
    clip_loss_bwd(image, text, scale, bias, row_lse, col_lse, row_coef, col_coef,
                  positive_offset: int, deterministic: bool)
        -> (grad_image (b, D), grad_text (n, D), grad_scale ())
    siglip_loss_fwd(image, text, scale, bias, positive_offset: int, deterministic: bool) -> loss_sum ()
    siglip_loss_bwd(image, text, scale, bias, positive_offset: int, grad_coef, deterministic: bool)
        -> (grad_image (b, D), grad_text (n, D), grad_bias ())

image (b, D) rows against text (n, D) columns; scale, bias, grad_coef 0-dim; the positives are the
pairs j = i + positive_offset (the distributed layer passes rank * b); outputs in the accumulation
dtype. clip_loss_bwd's G = R + C, R_ij = row_coef_i (P_ij - [pos]), C_ij = col_coef_j (Q_ij - [pos])
(P, Q: exp(S - row_lse), exp(S - col_lse)); grad_image = scale G @ text, grad_text = scale G.T @ image,
and grad_scale = sum_ij (R_ij log P_ij + C_ij log Q_ij) / scale, this block's share of d/d scale: over
any split of the whole S into blocks (the exchanges' row and column blocks) the shares add up to
sum_ij G_ij x_ij (x = image @ text.T), because every row of R and column of C of the whole sums to 0.
That form keeps the digits the fp32 log-sum-exps' rounding would cost sum G x (see kernels/clip_loss.py);
torch and triton return it. The cuda backend returns the block's sum_ij G_ij x_ij itself, which is also
a share (it adds up to the same total) but keeps fewer digits near zero loss (README, CUDA backend).
``deterministic=True`` asks for bitwise-repeatable results; with False a backend may take a
faster path whose last bits vary from run to run (triton: the locked column merge of its forward).
A backend declares ``deterministic=True`` when it can honour deterministic=True. (The exact math is
in fastclip/ops/clip_loss_torch.py and siglip_loss_torch.py, the reference backend; the autograd
Functions that call them are in fastclip/ops/clip_loss.py and siglip_loss.py.)
``backend="auto"`` walks ``AUTO_PRIORITY`` and takes the first backend with no reason against it; a
backend asked for by name that cannot run raises one ``ValueError`` listing every reason and its fix.
Nothing here touches the GPU at import time.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field

import torch

BACKEND_NAMES = ("auto", "torch", "triton", "cuda")
OP_NAMES = ("clip_loss", "siglip_loss")  # each backend has fastclip/ops/<op>_<backend>.py


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

    def not_supported_reasons(self, inputs: LossInputs) -> list[str]:
        reasons: list[str] = []
        for check in self.extra_checks:
            reasons += check(inputs)
        if inputs.device.type not in self.device_types:
            reasons.append(f"runs on {'/'.join(self.device_types)} tensors, got {inputs.device.type}")
        if inputs.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"supports dtypes {names}, got {str(inputs.dtype).replace('torch.', '')}")
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

    def op(self, op_name: str):
        """The module ``fastclip.ops.<op_name>_<backend>`` (imported on first use) with ``<op_name>_fwd/_bwd``.

        An already imported module comes from ``sys.modules`` so torch.compile can trace the lookup;
        select_backend imports every op module of the backend it picks, outside the graph.
        """
        name = f"fastclip.ops.{op_name}_{self.name}"
        return sys.modules.get(name) or importlib.import_module(name)

    def import_ops(self) -> None:
        for op_name in OP_NAMES:
            self.op(op_name)


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    properties = torch.cuda.get_device_properties(index)
    return properties.major, properties.minor


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device, read once per device and cached."""
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


def triton_interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        min_compute_capability=(7, 0), deterministic=True,
        description="CUDA C++ kernels for sm70+ (auto picks them on V100/T4, triton first on sm80+)",
        extra_checks=(_cuda_extension_checks,)),
    "triton": LossBackend(
        name="triton", device_types=("cuda", "cpu"),
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        min_compute_capability=(8, 0), deterministic=True,
        description="fused Triton kernels for sm80+ (CPU under TRITON_INTERPRET=1)",
        extra_checks=(_triton_checks,)),
    "torch": LossBackend(
        name="torch", device_types=("cpu", "cuda", "mps", "xpu", "meta"),
        dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64), deterministic=True,
        description="portable chunked PyTorch (the reference backend)"),
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
    BACKENDS[chosen].import_ops()  # so that a compiled graph finds them in sys.modules
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
