"""Triton building blocks shared by the CLIP and SigLIP loss kernels.

    _block_range          the indices of one block of rows or columns, and which are in range
    _similarity_tile      x = image[rows] @ text[cols].T for one (BLOCK_M, BLOCK_N) tile, looping over D
    _logits_tile          S = scale * x + bias for one tile, scale and bias read from their 0-dim tensors
    _lse_merge_kernel     merges per-block (max, sum-exp[, weighted sum]) partials into log-sum-exp, E[log p]
    merge_block           the merge kernel's block size for a length (fills the GPU)
    _locked_column_merge  merges one tile's column softmax partial into a running (max, sum, weighted sum) under a lock
    _log1p                log(1 + u) accurate for tiny u (no libdevice, so it also runs in the interpreter)
    TileConfig            one launch configuration (block sizes, warps, pipeline stages)

Statistics stay in natural units: logits minus their max are formed before any exponential, so
rounding is relative to that small difference (tl.exp maps to the hardware exp2 unit anyway).
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

@dataclass(frozen=True)
class TileConfig:
    """Block sizes of one S tile and the launch options that go with them."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int

    def launch_options(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps,
                "num_stages": self.num_stages}


def with_default_first(configs_by_arch: dict, defaults: dict) -> dict:
    """The same config lists with each named arch's default moved to the front (the launcher's pick)."""
    return {arch: (defaults[arch],) + tuple(c for c in configs if c != defaults[arch]) if arch in defaults
            else configs for arch, configs in configs_by_arch.items()}


@triton.jit
def _block_range(block, length, BLOCK: tl.constexpr):
    """(block * BLOCK + [0, BLOCK), which of those indices are < length)."""
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < length


@triton.jit
def _similarity_tile(image_ptr, text_ptr, rows, cols, row_valid, col_valid, dim,
                     stride_image_row, stride_image_dim, stride_text_row, stride_text_dim,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """x[m, n] = sum_d image[rows[m], d] * text[cols[n], d]  as a (BLOCK_M, BLOCK_N) fp32 tile.

    D is walked in BLOCK_D slices (CLIP's D of 512-1280 never fits one slice); the text slice is
    loaded as (BLOCK_D, BLOCK_N) so the dot needs no transpose. Out-of-range rows/cols load zeros.
    """
    d_range = tl.arange(0, BLOCK_D)
    image_ptrs = image_ptr + rows.to(tl.int64)[:, None] * stride_image_row + d_range[None, :] * stride_image_dim
    text_ptrs = text_ptr + cols.to(tl.int64)[None, :] * stride_text_row + d_range[:, None] * stride_text_dim
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        if EVEN_D:
            a = tl.load(image_ptrs, mask=row_valid[:, None], other=0.0)
            b = tl.load(text_ptrs, mask=col_valid[None, :], other=0.0)
        else:
            d_valid = d_range < dim - d_start
            a = tl.load(image_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
            b = tl.load(text_ptrs, mask=d_valid[:, None] & col_valid[None, :], other=0.0)
        if UPCAST_DOT:  # the CPU interpreter has no bf16 matmul: compute the same products in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        image_ptrs += BLOCK_D * stride_image_dim
        text_ptrs += BLOCK_D * stride_text_dim
    return acc


@triton.jit
def _shifted_state(m, l, w, new_max, HAS_EXPECTATIONS: tl.constexpr):
    """A softmax state (m, l, w) re-expressed relative to new_max >= m: (l e^(m - M), w') with M the
    finite shift. w is in log form, w = sum exp(S - m) (S - m), so w' = (w + l (m - M)) e^(m - M):
    every term of the sum keeps its sign (S <= M), nothing cancels. An empty state (m = -inf,
    l = w = 0) stays empty instead of becoming 0 * inf."""
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    factor = tl.exp(m - safe_max)
    shifted_l = l * factor
    shifted_w = w
    if HAS_EXPECTATIONS:
        gap = tl.where(m == float("-inf"), 0.0, m - safe_max)
        shifted_w = (w + l * gap) * factor
    return shifted_l, shifted_w


@triton.jit
def _locked_column_merge(lock_ptr, max_ptr, sum_ptr, wsum_ptr, cols, col_valid, tile_max, tile_sum, tile_wsum,
                         HAS_EXPECTATIONS: tl.constexpr):
    """Running column state (m, l, w) <- merged with this tile's partial, under the tile's spin lock.

    Math: the deterministic merge's, one part at a time: M = max(m, tile_max), l = l e^(m - M) +
    tile_sum e^(tile_max - M), w likewise in log form (_shifted_state). No log or division under the
    lock: the state stays (max, sum, weighted sum) and one O(n) pass (_lse_merge_kernel with no
    parts, FINALIZE) writes lse = M + log l and E[log Q] = w / l - log l once, as the deterministic
    path does, so the two are equally accurate whatever the number of row blocks. One lock per
    column tile (CCE merges its LSE the same way): the merge order is the order in which programs
    arrive, so the result is not bitwise repeatable; deterministic=True writes per-block partials instead.
    """
    while tl.atomic_cas(lock_ptr, 0, 1) == 1:
        pass
    old_max = tl.load(max_ptr + cols, mask=col_valid, other=float("-inf"))  # starts at -inf
    old_sum = tl.load(sum_ptr + cols, mask=col_valid, other=0.0)
    old_wsum = old_sum
    if HAS_EXPECTATIONS:
        old_wsum = tl.load(wsum_ptr + cols, mask=col_valid, other=0.0)
    new_max = tl.maximum(old_max, tile_max)
    old_sum, old_wsum = _shifted_state(old_max, old_sum, old_wsum, new_max, HAS_EXPECTATIONS)
    tile_sum, tile_wsum = _shifted_state(tile_max, tile_sum, tile_wsum, new_max, HAS_EXPECTATIONS)
    tl.store(max_ptr + cols, new_max, mask=col_valid)
    tl.store(sum_ptr + cols, old_sum + tile_sum, mask=col_valid)
    if HAS_EXPECTATIONS:
        tl.store(wsum_ptr + cols, old_wsum + tile_wsum, mask=col_valid)
    tl.debug_barrier()  # every thread's stores are issued before the lock is released
    tl.atomic_xchg(lock_ptr, 0)


@triton.jit
def _logits_tile(image_ptr, text_ptr, scale_ptr, bias_ptr, rows, cols, row_valid, col_valid, dim,
                 stride_image_row, stride_image_dim, stride_text_row, stride_text_dim,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """S = scale * x + bias for one (BLOCK_M, BLOCK_N) tile (the backward kernels' one tile each), fp32."""
    x = _similarity_tile(image_ptr, text_ptr, rows, cols, row_valid, col_valid, dim,
                         stride_image_row, stride_image_dim, stride_text_row, stride_text_dim,
                         BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION, UPCAST_DOT)
    return x * tl.load(scale_ptr).to(tl.float32) + tl.load(bias_ptr).to(tl.float32)


@triton.jit
def _log1p(u):
    """log(1 + u) for u >= 0, accurate when 1 + u rounds to 1 (Goldberg's correction)."""
    w = 1.0 + u
    rounded = w - 1.0
    return tl.where(rounded == 0.0, u, tl.log(w) * (u / tl.where(rounded == 0.0, 1.0, rounded)))


# Merge kernel blocks: a 1-D pass over O(B) statistics, one element per thread (4 warps at 128).
# The launcher takes the largest block that still gives every SM a few programs (merge_block), so
# B = 65536 runs 512 programs of 128 lanes rather than 64 of 1024, each looping over every part.
MERGE_BLOCK = 1024
MIN_MERGE_BLOCK = 128


def merge_block(length: int, target_programs: int) -> int:
    """The merge kernel's BLOCK: a power of two in [MIN_MERGE_BLOCK, MERGE_BLOCK] giving about
    target_programs programs over ``length`` indices (fewer only when length is small)."""
    block = MERGE_BLOCK
    while block > MIN_MERGE_BLOCK and -(-length // block) < target_programs:
        block //= 2
    return block


@triton.jit(do_not_specialize=["n_parts", "length", "stride_part"])
def _lse_merge_kernel(part_max_ptr, part_sum_ptr, part_wsum_ptr, n_parts, length, stride_part,
                      run_max_ptr, run_sum_ptr, run_wsum_ptr, lse_ptr, expect_ptr,
                      HAS_RUNNING: tl.constexpr, FINALIZE: tl.constexpr, HAS_EXPECTATIONS: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Merge n_parts partial softmax statistics per index, in a fixed order (bitwise repeatable).

    Math: part k holds (m_k, l_k = sum exp(S - m_k), w_k = sum exp(S - m_k) (S - m_k)), the
    weighted sum in log form (shifted logits, so it is small where the softmax is peaked and no
    |S|-sized terms cancel). The merge is m = max_k m_k, l = sum_k l_k exp(m_k - m),
    w = sum_k (w_k + l_k (m_k - m)) exp(m_k - m) (_shifted_state). Tiling: one program per BLOCK
    indices, a sequential loop over the parts (stride_part apart). With HAS_RUNNING the running
    state (run_max/run_sum/run_wsum) is merged first (n_parts = 0 only finalises it: the locked
    column path). FINALIZE writes lse = m + log l and, with HAS_EXPECTATIONS, the expected log
    probability E[log p] = w / l - log l (minus the entropy); else the merged state goes back to the
    running arrays. The division is the approximate one (div.full, 2 ulp), which keeps the IEEE
    division's called slow path out of the kernel (the offline sm80/sm90 compiles: no stack, no spill).
    """
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < length
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK,), tl.float32)
    w = tl.zeros((BLOCK,), tl.float32)
    if HAS_RUNNING:
        m = tl.load(run_max_ptr + offsets, mask=valid, other=float("-inf"))
        l = tl.load(run_sum_ptr + offsets, mask=valid, other=0.0)
        if HAS_EXPECTATIONS:
            w = tl.load(run_wsum_ptr + offsets, mask=valid, other=0.0)
    for k in range(0, n_parts):
        part = k * stride_part + offsets  # the launcher keeps workspaces under 2**31 elements
        part_max = tl.load(part_max_ptr + part, mask=valid, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + part, mask=valid, other=0.0)
        part_wsum = part_sum
        if HAS_EXPECTATIONS:
            part_wsum = tl.load(part_wsum_ptr + part, mask=valid, other=0.0)
        new_max = tl.maximum(m, part_max)
        l, w = _shifted_state(m, l, w, new_max, HAS_EXPECTATIONS)
        part_sum, part_wsum = _shifted_state(part_max, part_sum, part_wsum, new_max, HAS_EXPECTATIONS)
        l += part_sum
        if HAS_EXPECTATIONS:
            w += part_wsum
        m = new_max
    if FINALIZE:
        l = tl.where(l > 0.0, l, 1.0)  # padded lanes and empty indices: no log(0)
        log_l = tl.log(l)
        tl.store(lse_ptr + offsets, m + log_l, mask=valid)
        if HAS_EXPECTATIONS:
            tl.store(expect_ptr + offsets, tl.fdiv(w, l, ieee_rounding=False) - log_l, mask=valid)
    else:
        tl.store(run_max_ptr + offsets, m, mask=valid)
        tl.store(run_sum_ptr + offsets, l, mask=valid)
        if HAS_EXPECTATIONS:
            tl.store(run_wsum_ptr + offsets, w, mask=valid)
