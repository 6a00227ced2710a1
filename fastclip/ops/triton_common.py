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

from fastclip.backends import device_capability, triton_interpret_mode
from fastclip.ops.workspace import workspace_bytes

FP16_HEADROOM = 256.0  # G is stored times 2^8 in fp16 so softmax / sigmoid values ~1/B stay out of subnormals
FP32_PRECISION_ENV = "FASTCLIP_FP32_PRECISION"
AUTOTUNE_ENV = "FASTCLIP_AUTOTUNE"
TF32_LSE_BOUND_PER_SCALE = 2.0**-9  # |LSE error| / logit_scale with truncated TF32 operands, unit-norm features
MAX_WORKSPACE_ELEMENTS = 2**31 - 1  # kernels index one workspace with 32-bit offsets
_TUNED_CONFIGS: dict = {}


def allocate(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer for a kernel to fill (every output and workspace goes through here).

    Tests replace this function with a NaN-filled allocator to prove every element is written.
    """
    return torch.empty(shape, dtype=dtype, device=device)


def check_inputs(image: torch.Tensor, text: torch.Tensor, *scalars: torch.Tensor) -> None:
    """The launchers' own checks (the loss API checks more, earlier): dtypes, shapes, one device."""
    if image.dtype not in (torch.float32, torch.float16, torch.bfloat16) or text.dtype != image.dtype:
        raise TypeError(f"the triton backend takes float32/float16/bfloat16 features of one dtype, got "
                        f"{image.dtype} and {text.dtype}: cast them, or use backend='torch'")
    if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1]:
        raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must be (b, D) and (n, D)")
    for tensor in (text, *scalars):
        if tensor.device != image.device:
            raise ValueError(f"all inputs must be on {image.device}, one is on {tensor.device}: move it there")


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


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' ``input_precision`` for tl.dot: FASTCLIP_FP32_PRECISION for fp32, else the default."""
    if dtype != torch.float32:
        return "tf32"  # only fp32 operands are affected; 16-bit dots are always exact products
    raw = os.environ.get(FP32_PRECISION_ENV, "tf32").strip().lower() or "tf32"
    if raw not in ("tf32", "ieee"):
        raise ValueError(f"{FP32_PRECISION_ENV}={raw!r} is not a choice: set it to 'tf32' (fast, default) "
                         "or 'ieee' (exact fp32 products)")
    return raw


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


def row_chunk(n_rows: int, block_m: int, bytes_per_block: int, elements_per_block: int) -> int:
    """Rows per chunk: the most whole row blocks whose workspace (``bytes_per_block`` and
    ``elements_per_block`` per block of block_m rows) fits workspace_bytes(); at least one block."""
    blocks = min(workspace_bytes() // max(1, bytes_per_block), MAX_WORKSPACE_ELEMENTS // max(1, elements_per_block))
    return min(n_rows, max(1, blocks) * block_m)


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


def gemm_operand(tensor: torch.Tensor) -> torch.Tensor:
    """Backward GEMM operand: the input dtype on GPUs (tensor cores), fp32 on CPU (exact and fast)."""
    return tensor.float() if tensor.device.type == "cpu" else tensor


_OUT_DTYPE_FAILED: set = set()  # (op, gemm_kind()) where a torch GEMM with out_dtype=float32 raised once


def gemm_kind(left: torch.Tensor, right: torch.Tensor) -> tuple:
    """(device index, dtype, layout of each operand): cuBLAS picks a different kernel for a transposed
    operand (G.T @ I) than for a plain one (G @ T), so one failing must not switch off the other."""
    def layout(tensor):
        return "T" if tensor.stride(0) == 1 and tensor.stride(1) != 1 else "N"
    return left.device.index, left.dtype, layout(left), layout(right)


def _with_fp32_out(op: str, left: torch.Tensor, right: torch.Tensor, fast, fallback):
    """fast() (a torch GEMM with out_dtype=float32: 16-bit operands, fp32 products summed and written
    in fp32 by cuBLAS, torch >= 2.8) unless this (op, kind) raised before; else fallback(). The first
    call of each kind is the probe: a failure is remembered, so it is tried once per process."""
    key = (op, gemm_kind(left, right))
    if left.device.type == "cuda" and hasattr(torch.ops.aten.mm, "dtype") and key not in _OUT_DTYPE_FAILED:
        try:
            return fast()
        except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
            _OUT_DTYPE_FAILED.add(key)
    return fallback()


def matmul_fp32(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right as fp32, accumulated in fp32 (older torch: a 16-bit product, upcast)."""
    if left.dtype == torch.float32:
        return torch.mm(left, right)
    return _with_fp32_out("mm", left, right, lambda: torch.mm(left, right, out_dtype=torch.float32),
                          lambda: torch.mm(left, right).float())


def mm_fp32_into(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """out (fp32) = left @ right, written by the GEMM itself where torch allows (no transient)."""
    if left.dtype == out.dtype:
        return torch.mm(left, right, out=out)
    return _with_fp32_out("mm_out", left, right,
                          lambda: torch.mm(left, right, out_dtype=out.dtype, out=out),
                          lambda: out.copy_(matmul_fp32(left, right)))


def addmm_fp32_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """out (fp32) += left @ right inside the GEMM (cuBLAS beta = 1 on the fp32 out, out_dtype for 16-bit
    operands where torch allows): no (rows, D) fp32 transient. Otherwise one fp32 product is added."""
    if left.dtype == out.dtype:
        return out.addmm_(left, right)
    return _with_fp32_out("addmm", left, right,
                          lambda: torch.addmm(out, left, right, out_dtype=out.dtype, out=out),
                          lambda: out.add_(matmul_fp32(left, right)))


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
    chunk = row_chunk(n_rows, block_m, bytes_per_block=block_m * n_cols * image.element_size() + 4 * col_tiles,
                      elements_per_block=block_m * n_cols)
    grad_logits = allocate((chunk, n_cols), image.dtype, image.device)
    tile_sums = allocate((cdiv(chunk, block_m) * col_tiles,), torch.float32, image.device)
    grad_image = allocate(tuple(image.shape), torch.float32, image.device)
    grad_text = allocate(tuple(text.shape), torch.float32, image.device)
    total = torch.zeros((), dtype=torch.float32, device=image.device)
    image_gemm, text_gemm = gemm_operand(image), gemm_operand(text)
    for start in range(0, n_rows, chunk):
        rows = min(chunk, n_rows - start)
        grad_rows, chunk_sums = grad_logits[:rows], tile_sums[:cdiv(rows, block_m) * col_tiles]
        write_chunk(start, rows, image[start:start + rows], grad_rows, chunk_sums)
        total += chunk_sums.sum()
        if grad_rows.dtype != text_gemm.dtype:
            grad_rows = grad_rows.to(text_gemm.dtype)  # CPU: the fp32 GEMM operands of gemm_operand
        mm_fp32_into(grad_image[start:start + rows], grad_rows, text_gemm)
        # grad_text is read and written once per chunk (8 bytes per element of (n, D)): the price of
        # the bounded G workspace; a larger FASTCLIP_WORKSPACE_MB means fewer chunks.
        accumulate_product = mm_fp32_into if start == 0 else addmm_fp32_
        accumulate_product(grad_text, grad_rows.t(), image_gemm[start:start + rows])
    return grad_image, grad_text, total
