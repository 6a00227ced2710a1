"""Triton building blocks shared by the CLIP and SigLIP loss kernels.

    _block_range          the indices of one block of rows or columns, and which are in range
    _similarity_tile      x = image[rows] @ text[cols].T for one (BLOCK_M, BLOCK_N) tile, looping over D
    _logits_tile          S = scale * x + bias for one tile, scale and bias read from their 0-dim tensors
    _lse_merge_kernel     merges per-block (max, sum-exp[, weighted sum]) partials into log-sum-exp
    _locked_column_merge  merges one tile's column softmax partial into running (lse, expectation) under a lock
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
def _locked_column_merge(lock_ptr, lse_ptr, expect_ptr, cols, col_valid, tile_max, tile_sum, tile_wsum,
                         HAS_EXPECTATIONS: tl.constexpr):
    """lse_j <- log(e^lse_j + e^tile_lse_j) and expect_j re-weighted by mass, under the tile's spin lock.

    Math: tile_lse = tile_max + log(tile_sum); merged = max + log(e^(lse - max) + e^(tile_lse - max));
    expect = expect e^(lse - merged) + (tile_wsum / tile_sum) e^(tile_lse - merged). One lock per
    column tile (CCE merges its LSE the same way): the merge order is the order in which programs
    arrive, so the result is not bitwise repeatable; deterministic=True writes per-block partials instead.
    """
    tile_sum = tl.where(col_valid, tile_sum, 1.0)
    tile_lse = tl.where(col_valid, tile_max + tl.log(tile_sum), 0.0)
    while tl.atomic_cas(lock_ptr, 0, 1) == 1:
        pass
    old_lse = tl.load(lse_ptr + cols, mask=col_valid, other=0.0)
    top = tl.maximum(old_lse, tile_lse)  # old_lse starts at -inf; tile_lse is finite
    merged = top + tl.log(tl.exp(old_lse - top) + tl.exp(tile_lse - top))
    if HAS_EXPECTATIONS:
        old_expect = tl.load(expect_ptr + cols, mask=col_valid, other=0.0)
        expect = old_expect * tl.exp(old_lse - merged) + (tile_wsum / tile_sum) * tl.exp(tile_lse - merged)
        tl.store(expect_ptr + cols, expect, mask=col_valid)
    tl.store(lse_ptr + cols, merged, mask=col_valid)
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


# Merge kernel block: a 1-D pass over O(B) statistics; 1024 lanes keep it bandwidth-bound and short.
MERGE_BLOCK = 1024


@triton.jit(do_not_specialize=["n_parts", "length", "stride_part"])
def _lse_merge_kernel(part_max_ptr, part_sum_ptr, part_wsum_ptr, n_parts, length, stride_part,
                      run_max_ptr, run_sum_ptr, run_wsum_ptr, lse_ptr, expect_ptr,
                      HAS_RUNNING: tl.constexpr, FINALIZE: tl.constexpr, HAS_EXPECTATIONS: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Merge n_parts partial softmax statistics per index, in a fixed order (bitwise repeatable).

    Math: part k holds (m_k, l_k = sum exp(S - m_k), w_k = sum exp(S - m_k) x). The merge is
    m = max_k m_k, l = sum_k l_k exp(m_k - m), w likewise. Tiling: one program per BLOCK indices, a
    sequential loop over the parts (stride_part apart). With HAS_RUNNING the running state
    (run_max/run_sum/run_wsum) is merged first; FINALIZE writes lse = m + log l and, with
    HAS_EXPECTATIONS, expect = w / l, else the merged state goes back to the running arrays.
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
        new_max = tl.maximum(m, part_max)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        old_factor = tl.exp(m - safe_max)
        part_factor = tl.exp(part_max - safe_max)
        l = l * old_factor + part_sum * part_factor
        if HAS_EXPECTATIONS:
            part_wsum = tl.load(part_wsum_ptr + part, mask=valid, other=0.0)
            w = w * old_factor + part_wsum * part_factor
        m = new_max
    if FINALIZE:
        l = tl.where(valid, l, 1.0)  # padded lanes: no log(0)
        tl.store(lse_ptr + offsets, m + tl.log(l), mask=valid)
        if HAS_EXPECTATIONS:
            tl.store(expect_ptr + offsets, w / l, mask=valid)
    else:
        tl.store(run_max_ptr + offsets, m, mask=valid)
        tl.store(run_sum_ptr + offsets, l, mask=valid)
        if HAS_EXPECTATIONS:
            tl.store(run_wsum_ptr + offsets, w, mask=valid)
