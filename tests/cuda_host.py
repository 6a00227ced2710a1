"""The host build of the CUDA loss primitives (csrc/host_reference.cpp), callable from the tests.

host_reference.cpp runs the device kernels' block programs and chunk loops (csrc/tile_programs.h,
csrc/chunk_driver.h, csrc/tile_math.h) with a one-thread HostBlock and fp32 tile products. It is built
with the system C++ compiler (about a second) into a folder the caller gives, and wrapped here with the
primitive signatures of fastclip/ops/clip_loss_torch.py and siglip_loss_torch.py (fp32 CPU tensors),
so the real autograd Functions can run on it (``HostBackend``).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = ("host_reference.cpp", "chunk_driver.h", "tile_programs.h", "tile_math.h")
I64, F32, PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
FEATURES = [PTR, I64, I64]  # data, stride along rows, stride along D (elements)

SIGNATURES = {
    "fastclip_host_clip_loss_fwd": (I64, [*FEATURES, *FEATURES, I64, I64, I64, F32, F32, ctypes.c_int, I64, I64,
                                          PTR, PTR, PTR, PTR]),
    "fastclip_host_clip_loss_bwd": (I64, [*FEATURES, *FEATURES, I64, I64, I64, F32, F32, PTR, PTR, PTR, PTR, I64,
                                          F32, I64, PTR, PTR, PTR]),
    "fastclip_host_siglip_loss_fwd": (None, [*FEATURES, *FEATURES, I64, I64, I64, F32, F32, I64, I64, PTR]),
    "fastclip_host_siglip_loss_bwd": (I64, [*FEATURES, *FEATURES, I64, I64, I64, F32, F32, I64, F32, F32, I64,
                                            PTR, PTR, PTR]),
    "fastclip_host_element_offset": (I64, [I64, I64, I64, I64]),
    "fastclip_host_row_byte_offset": (I64, [I64, I64, ctypes.c_int]),
    "fastclip_host_row_chunk": (None, [I64, I64, I64, I64, I64, PTR]),
    "fastclip_host_choose_path": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int]),
    "fastclip_host_path_compiled": (ctypes.c_int, [ctypes.c_int, ctypes.c_int]),
    "fastclip_host_grad_in_fp32": (ctypes.c_int, [ctypes.c_int]),
}
# csrc/tile_math.h's enums
PATHS = {"half_mma": 0, "bf16_mma": 1, "tf32_mma": 2, "float_fma": 3, "bf16_fma": 4}
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BLOCK_ROWS, BLOCK_COLS = 128, 64
FP16_HEADROOM = 256.0


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


@pytest.fixture(scope="session")
def host_library(tmp_path_factory) -> ctypes.CDLL:
    if compiler() is None:
        pytest.skip("no C++ compiler for the host build")
    return build(tmp_path_factory.mktemp("cuda_host")).library


@pytest.fixture
def host(host_library) -> "HostBuild":
    """The host build (compiled once per session) with default knobs (import both fixtures into a module)."""
    return HostBuild(host_library)


def skip_without_gpu_kernels(monkeypatch) -> None:
    """Skip unless the built extension runs on this GPU; then exact fp32 products (fp32 parity with
    open_clip needs them; TF32 has its own test)."""
    from fastclip.ops import cuda_common

    reasons = cuda_common.install_reasons() or cuda_common.arch_reasons(torch.cuda.get_device_capability())
    if reasons:
        pytest.skip("; ".join(reasons))
    monkeypatch.setenv("FASTCLIP_FP32_PRECISION", "ieee")


def build(directory: Path) -> "HostBuild":
    """Compile host_reference.cpp into ``directory`` and load it."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++/g++) on PATH: install one or set CXX")
    library = Path(directory) / "libfastclip_host_reference.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    str(CSRC / "host_reference.cpp"), "-o", str(library)], check=True, capture_output=True, text=True)
    return HostBuild(ctypes.CDLL(str(library)))


def _features(tensor: torch.Tensor) -> list:
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or tensor.dim() != 2:
        raise TypeError("the host build takes 2-D float32 CPU features")
    return [tensor.data_ptr(), tensor.stride(0), tensor.stride(1)]


def _vector(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float32).contiguous()


class HostBuild:
    """The C entry points, and the four primitives with the torch backend's signatures.

    workspace_bytes, target_programs and headroom are the knobs the device launcher sets from the GPU
    (FASTCLIP_WORKSPACE_MB, 2 x SM count, 2^8 for an fp16 workspace); tests change them to force
    several chunks, several column splits and the fp16 storage multiplier.
    """

    def __init__(self, library: ctypes.CDLL):
        self.library = library
        for name, (result, arguments) in SIGNATURES.items():
            function = getattr(library, name)
            function.restype, function.argtypes = result, arguments
        self.workspace_bytes = 128 * 2**20
        self.target_programs = 2
        self.headroom = 1.0
        self.calls: list[tuple[str, int]] = []  # (primitive, row chunks used)

    def clip_loss_fwd(self, image, text, scale, bias, with_expectations, deterministic=False):
        n_rows, dim = image.shape
        n_cols = text.shape[0]
        outputs = [torch.full((n,), float("nan")) for n in (n_rows, n_cols)]
        outputs += [torch.full((n if with_expectations else 0,), float("nan")) for n in (n_rows, n_cols)]
        chunks = self.library.fastclip_host_clip_loss_fwd(
            *_features(image), *_features(text), n_rows, n_cols, dim, float(scale), float(bias),
            int(with_expectations), self.workspace_bytes, self.target_programs,
            *[output.data_ptr() if output.numel() else None for output in outputs])
        self.calls.append(("clip_loss_fwd", chunks))
        return tuple(outputs)

    def clip_loss_bwd(self, image, text, scale, bias, row_lse, col_lse, row_coef, col_coef, positive_offset,
                      deterministic=False):
        n_rows, dim = image.shape
        n_cols = text.shape[0]
        grad_image, grad_text = torch.full((n_rows, dim), float("nan")), torch.full((n_cols, dim), float("nan"))
        grad_scale = torch.full((), float("nan"))
        vectors = [_vector(v) for v in (row_lse, col_lse, row_coef, col_coef)]
        chunks = self.library.fastclip_host_clip_loss_bwd(
            *_features(image), *_features(text), n_rows, n_cols, dim, float(scale), float(bias),
            *[v.data_ptr() for v in vectors], int(positive_offset), self.headroom, self.workspace_bytes,
            grad_image.data_ptr(), grad_text.data_ptr(), grad_scale.data_ptr())
        self.calls.append(("clip_loss_bwd", chunks))
        return grad_image, grad_text, grad_scale

    def siglip_loss_fwd(self, image, text, scale, bias, positive_offset, deterministic=False):
        loss_sum = torch.full((), float("nan"))
        self.library.fastclip_host_siglip_loss_fwd(
            *_features(image), *_features(text), image.shape[0], text.shape[0], image.shape[1], float(scale),
            float(bias), int(positive_offset), self.target_programs, loss_sum.data_ptr())
        return loss_sum

    def siglip_loss_bwd(self, image, text, scale, bias, positive_offset, grad_coef, deterministic=False):
        n_rows, dim = image.shape
        n_cols = text.shape[0]
        grad_image, grad_text = torch.full((n_rows, dim), float("nan")), torch.full((n_cols, dim), float("nan"))
        grad_bias = torch.full((), float("nan"))
        chunks = self.library.fastclip_host_siglip_loss_bwd(
            *_features(image), *_features(text), n_rows, n_cols, dim, float(scale), float(bias),
            int(positive_offset), float(grad_coef), self.headroom, self.workspace_bytes,
            grad_image.data_ptr(), grad_text.data_ptr(), grad_bias.data_ptr())
        self.calls.append(("siglip_loss_bwd", chunks))
        return grad_image, grad_text, grad_bias

    def row_chunk(self, n_rows, bytes_per_row_block, workspace_bytes, max_row_blocks, index) -> dict:
        out = (I64 * 5)()
        self.library.fastclip_host_row_chunk(n_rows, bytes_per_row_block, workspace_bytes, max_row_blocks, index,
                                             ctypes.cast(out, PTR))
        return dict(zip(("start", "rows", "row_blocks", "first_block", "count"), list(out)))


class HostBackend:
    """A stand-in LossBackend whose ``op(name)`` is the host build, for the real autograd Functions."""

    name = "cuda-host"

    def __init__(self, host: HostBuild):
        self.host = host

    def op(self, op_name: str):
        if op_name == "clip_loss":
            return SimpleNamespace(clip_loss_fwd=self.host.clip_loss_fwd, clip_loss_bwd=self.host.clip_loss_bwd)
        return SimpleNamespace(siglip_loss_fwd=self.host.siglip_loss_fwd, siglip_loss_bwd=self.host.siglip_loss_bwd)


def assert_outputs_match_truth(ours: dict, baseline: dict, truth: dict, dtype) -> None:
    """Every output of ``ours`` written (no NaN left from a poisoned buffer) and within the error bars of
    tests/numerics.py against the same-dtype baseline; "grad_*" outputs are judged as backward."""
    from tests.numerics import assert_close_to_truth

    for name, value in ours.items():
        assert not value.isnan().any(), f"{name} has elements no kernel wrote"
        kind = "bwd" if name.startswith("grad") else "fwd"
        assert_close_to_truth(value, baseline[name], truth[name], dtype=dtype, kind=kind, name=name)


# ---- fp64 truths (materialising S) and inputs ------------------------------------------------------------
def positives(n_rows: int, n_cols: int, positive_offset: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """The (n_rows, n_cols) indicator of the positive pairs j = i + positive_offset."""
    rows = torch.arange(n_rows, device=device)
    mask = torch.zeros(n_rows, n_cols, dtype=dtype, device=device)
    valid = (rows + positive_offset >= 0) & (rows + positive_offset < n_cols)
    mask[rows[valid], rows[valid] + positive_offset] = 1
    return mask


def clip_truth(image, text, scale, bias, row_coef, col_coef, positive_offset, grad_dtype=None) -> dict:
    """Every output of the CLIP primitives from the dense S: in fp64 the truth; with grad_dtype, fp32 with
    G rounded to that dtype before the GEMMs (what a same-dtype PyTorch backward does on a GPU: the baseline)."""
    compute = torch.float64 if grad_dtype is None else torch.float32
    image, text = image.to(compute), text.to(compute)
    x = image @ text.T
    logits = float(scale) * x + float(bias)
    row_lse, col_lse = logits.logsumexp(1), logits.logsumexp(0)
    row_softmax, col_softmax = (logits - row_lse[:, None]).exp(), (logits - col_lse).exp()
    positive = positives(*logits.shape, positive_offset, compute, logits.device)
    row_coef, col_coef = row_coef.to(logits.device, compute), col_coef.to(logits.device, compute)
    row_part = row_coef[:, None] * (row_softmax - positive)
    col_part = col_coef * (col_softmax - positive)
    # the block's share of d scale (fastclip/backends.py): sum G x only when rows and columns are whole
    grad_scale = (row_part * (logits - row_lse[:, None]) + col_part * (logits - col_lse)).sum() / float(scale)
    grad = row_part + col_part
    if grad_dtype is not None:
        grad = grad.to(grad_dtype).to(compute)
    # the expected log-probabilities E[log P] (minus the entropies), as the forward returns them
    return {"row_lse": row_lse, "col_lse": col_lse, "row_expect": (row_softmax * (logits - row_lse[:, None])).sum(1),
            "col_expect": (col_softmax * (logits - col_lse)).sum(0), "grad_image": float(scale) * grad @ text,
            "grad_text": float(scale) * grad.T @ image, "grad_scale": grad_scale}


def siglip_truth(image, text, scale, bias, positive_offset, grad_coef, grad_dtype=None) -> dict:
    """The SigLIP primitives' outputs from the dense S (fp64 truth, or the same-dtype baseline as above)."""
    compute = torch.float64 if grad_dtype is None else torch.float32
    image, text = image.to(compute), text.to(compute)
    logits = float(scale) * image @ text.T + float(bias)
    positive = positives(*logits.shape, positive_offset, compute, logits.device)
    grad = torch.sigmoid(logits) - positive
    if grad_dtype is not None:
        grad = grad.to(grad_dtype).to(compute)
    grad = float(grad_coef) * grad
    return {"loss_sum": -torch.nn.functional.logsigmoid((2 * positive - 1) * logits).sum(),
            "grad_image": float(scale) * grad @ text, "grad_text": float(scale) * grad.T @ image,
            "grad_bias": grad.sum()}


def random_block(n_rows: int, n_cols: int, dim: int, seed: int, *, with_bias: bool = True, dtype=torch.float32,
                 device="cpu"):
    """Unit-norm rows/columns with aligned pairs, a scale in [5, 50], a bias in [-5, 5] (or 0) and
    positive per-row/per-column coefficients ~1/b, 1/n."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n_rows, dim, generator=generator, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(n_cols, dim, generator=generator, dtype=torch.float64), dim=-1)
    text[: min(n_rows, n_cols)] += 0.5 * image[: min(n_rows, n_cols)]
    scale = torch.tensor(float(torch.empty(()).uniform_(5, 50, generator=generator)))
    bias = torch.tensor(float(torch.empty(()).uniform_(-5, 5, generator=generator)) if with_bias else 0.0)
    row_coef = torch.rand(n_rows, generator=generator) / n_rows
    col_coef = torch.rand(n_cols, generator=generator) / n_cols
    return (image.to(device, dtype), text.to(device, dtype), scale.to(device), bias.to(device), row_coef.to(device),
            col_coef.to(device))
