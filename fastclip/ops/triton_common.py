"""Launch plumbing shared by the Triton loss launchers (clip_loss_triton.py, siglip_loss_triton.py).

Settings, all read at call time (no process-wide toggles, nothing queried at import):
    FASTCLIP_FP32_PRECISION = tf32 (default) | ieee   how the kernels' dots treat fp32 inputs: TF32
        tensor cores (10-bit mantissa products, ~8x faster) or exact fp32 FMA. The backward cuBLAS
        GEMMs follow torch.backends.cuda.matmul.allow_tf32 as every torch matmul does. Triton's TF32
        dot truncates the operands (no rounding), so with unit-norm fp32 features each logit is off
        by at most 2^-9 and each log-sum-exp by at most TF32_LSE_BOUND_PER_SCALE x logit_scale
        (emulated in tests/test_tf32_bound.py: ~2e-4 at scale 10, ~1e-2 at 100); use ieee where
        that matters near scale 100. 16-bit features are unaffected (their products are exact).
    FASTCLIP_AUTOTUNE = 1    time every tile config declared for this GPU's architecture (sm80/sm90
        lists in kernels/clip_loss.py) once per shape and keep the fastest; otherwise the first
        (default) config of the list is used with no timing.
    FASTCLIP_WORKSPACE_MB    the bound of the transient workspaces (fastclip.ops.workspace).
Under TRITON_INTERPRET=1 the kernels run on CPU tensors with the "interpreter" tile config.
"""
from __future__ import annotations

import functools
import os

import torch

from fastclip.checks import check_kernel_inputs
from fastclip.devices import FP32_PRECISION_ENV, device_capability, dot_precision, gemm_dtype, triton_interpret_mode
from fastclip.ops.gemm import addmm_fp32_, mm_fp32_into
from fastclip.ops.workspace import allocate, rows_per_chunk

FP16_HEADROOM = 256.0  # G is stored times 2^8 in fp16 so softmax / sigmoid values ~1/B stay out of subnormals
AUTOTUNE_ENV = "FASTCLIP_AUTOTUNE"
DEVICES = ("cuda", "cpu")  # CPU tensors only under TRITON_INTERPRET=1 (fastclip.backends checks that)
TF32_LSE_BOUND_PER_SCALE = 2.0**-9  # |LSE error| / logit_scale with truncated TF32 operands, unit-norm features
_TUNED_CONFIGS: dict = {}


def check_inputs(image: torch.Tensor, text: torch.Tensor, *others: torch.Tensor) -> None:
    check_kernel_inputs("triton", DEVICES, image, text, *others)


def shape_key(image: torch.Tensor, text: torch.Tensor) -> tuple:
    """What the autotuner keys a timing on: power-of-two buckets of b and n, D, dtype, dot precision."""
    bucket = triton_next_power_of_2
    return bucket(image.shape[0]), bucket(text.shape[0]), image.shape[1], image.dtype, dot_precision(image.dtype)


def launch_options(config, dtype: torch.dtype, dim: int) -> dict:
    """The keyword arguments every S-tile kernel takes: dot flags and the config's blocks and warps."""
    if triton_interpret_mode():
        _interpreter_index_fix()
    return {"DOT_PRECISION": dot_precision(dtype), "UPCAST_DOT": upcast_dot(dtype),
            "BLOCK_D": block_d(config, dim, torch.finfo(dtype).bits // 8), **config.launch_options()}


@functools.lru_cache(maxsize=None)
def _interpreter_index_fix() -> None:
    """Make triton 3.6's CPU interpreter run loops whose bound is a kernel argument under numpy >= 2.4.

    That interpreter passes int arguments as shape-(1,) arrays and its tensors' __index__ calls
    int() on them, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"): every `for ... in range(0, n)` with a runtime n fails. Triton 3.7 squeezes first;
    under TRITON_INTERPRET=1 only, on an older triton with a newer numpy, the launchers apply that
    same fix to the interpreter's tensor patching, once. Compiled GPU kernels never pass here.
    """
    import numpy
    import triton
    from triton.runtime import interpreter

    def release(version: str) -> tuple:
        return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if (original is None or release(triton.__version__) >= (3, 7) or release(numpy.__version__) < (2, 4)
            or getattr(original, "squeezes_index", False)):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def upcast_dot(dtype: torch.dtype) -> bool:
    """The CPU interpreter cannot multiply bf16 blocks: the kernels then upcast them to fp32 first."""
    return triton_interpret_mode() and dtype == torch.bfloat16


def architecture(device: torch.device) -> str:
    """Key of the tile config lists: "sm90" (Hopper and newer), "sm80" (Ampere/Ada), "interpreter"."""
    if device.type != "cuda":
        return "interpreter"
    major, _ = device_capability(device)
    return "sm90" if major >= 9 else "sm80"


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def block_d(config, dim: int, element_size: int = 2) -> int:
    """The D slice: the config's (counted in 16-bit elements, so fp32 slices are half as long and
    use the same shared memory), shrunk to the next power of two of a small D; >= 16 for tl.dot."""
    return max(16, min(config.block_d * 2 // element_size, triton_next_power_of_2(dim)))


def triton_next_power_of_2(value: int) -> int:
    return 1 << max(0, (int(value) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def column_splits(n_row_blocks: int, n_cols: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(n_splits, tiles_per_split): column tiles of block_n per split, so that row blocks x splits
    fills the GPU about twice over. Every split but the last has tiles_per_split tiles.

    A rank's few local rows against the global columns would otherwise leave most SMs idle. In the
    interpreter two splits exercise the row-partial merge.
    """
    col_tiles = cdiv(n_cols, block_n)
    target = 2 if device.type != "cuda" else 2 * _multiprocessors(device.index or 0)
    splits = min(col_tiles, max(1, cdiv(target, n_row_blocks)))
    tiles_per_split = cdiv(col_tiles, splits)
    return cdiv(col_tiles, tiles_per_split), tiles_per_split


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0").strip() not in ("", "0")


def choose_config(name: str, configs_by_arch: dict, device: torch.device, shape_key: tuple, launch):
    """The tile config for this call: the architecture's default, or with FASTCLIP_AUTOTUNE=1 the
    fastest of its list, timed once per (op, device, shape_key) by running ``launch(config)``."""
    configs = configs_by_arch[architecture(device)]
    if device.type != "cuda" or not autotune_enabled() or len(configs) == 1:
        return configs[0]
    key = (name, device.index, shape_key)
    if key not in _TUNED_CONFIGS:
        from triton.testing import do_bench

        timings = []
        for config in configs:
            try:
                timings.append((do_bench(lambda: launch(config), warmup=5, rep=20), config))
            except Exception as error:  # e.g. out of shared memory on a smaller sm8x part
                if "resources" not in str(error).lower() and "shared memory" not in str(error).lower():
                    raise
        _TUNED_CONFIGS[key] = min(timings, key=lambda pair: pair[0])[1]
    return _TUNED_CONFIGS[key]


def chunked_backward(image: torch.Tensor, text: torch.Tensor, config, write_chunk):
    """The semi-fused backward's row-chunk loop, shared by both losses.

    For each chunk of rows (whole row blocks whose G and tile sums fit workspace_bytes()),
    ``write_chunk(start, rows, image_rows, grad_rows, tile_sums)`` launches the loss's kernel, which
    writes G (the chunk's rows against all columns, in the input dtype) into ``grad_rows`` and one
    fp32 sum per S tile into ``tile_sums[pid_m * n_col_tiles + pid_n]``; then two cuBLAS GEMMs
    consume G, each writing fp32 straight into its output: grad_image[rows] = G @ text and
    grad_text (+)= G.T @ image[rows]. Returns (grad_image, grad_text, the sum of every tile sum):
    fp32, unscaled; the tile sums are added chunk by chunk in a fixed order. Extra memory: the two
    (., D) fp32 outputs and the workspace (G and the chunk's tile sums).
    """
    n_rows, n_cols = image.shape[0], text.shape[0]
    block_m = config.block_m
    col_tiles = cdiv(n_cols, config.block_n)
    chunk = rows_per_chunk(n_rows, bytes_per_block=block_m * n_cols * image.element_size() + 4 * col_tiles,
                           block_rows=block_m, elements_per_block=block_m * n_cols)
    grad_logits = allocate((chunk, n_cols), image.dtype, image.device)
    tile_sums = allocate((cdiv(chunk, block_m) * col_tiles,), torch.float32, image.device)
    grad_image = allocate(tuple(image.shape), torch.float32, image.device)
    grad_text = allocate(tuple(text.shape), torch.float32, image.device)
    total = torch.zeros((), dtype=torch.float32, device=image.device)
    image_gemm, text_gemm = image.to(gemm_dtype(image)), text.to(gemm_dtype(text))
    for start in range(0, n_rows, chunk):
        rows = min(chunk, n_rows - start)
        grad_rows, chunk_sums = grad_logits[:rows], tile_sums[:cdiv(rows, block_m) * col_tiles]
        write_chunk(start, rows, image[start:start + rows], grad_rows, chunk_sums)
        total += chunk_sums.sum()
        if grad_rows.dtype != text_gemm.dtype:
            grad_rows = grad_rows.to(text_gemm.dtype)  # CPU: the fp32 GEMM operands of gemm_dtype
        mm_fp32_into(grad_image[start:start + rows], grad_rows, text_gemm)
        # grad_text is read and written once per chunk (8 bytes per element of (n, D)): the price of
        # the bounded G workspace; a larger FASTCLIP_WORKSPACE_MB means fewer chunks.
        accumulate_product = mm_fp32_into if start == 0 else addmm_fp32_
        accumulate_product(grad_text, grad_rows.t(), image_gemm[start:start + rows])
    return grad_image, grad_text, total
