"""Triton kernels of the CLIP loss: bidirectional log-sum-exp forward, semi-fused backward.

    _clip_loss_fwd_kernel   one pass over S = scale * I @ T.T + bias -> row and column softmax partials
    _clip_loss_bwd_kernel   G = dL/dS for a row chunk, written (rescaled) in the input dtype
    _lse_merge_kernel       (kernels/common.py) merges the partials into row_lse / col_lse

The launchers (fastclip/ops/clip_loss_triton.py) chain them; the two backward GEMMs dI = s G T and
dT = s G^T I run on cuBLAS from the G workspace. Why semi-fused (docs/design.md, section 3, "The
Triton kernels"): a fully fused backward must merge dI/dT tiles of D = 512-1280 columns with atomics,
about 2 (B/BLOCK_M) B D fp32 writes (~137 GB at B = 65k, D = 512), more than the GEMMs; writing G once
in bf16 and reading it twice costs ~6 bytes per S element and is bitwise deterministic.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (MERGE_BLOCK, TileConfig, _block_range, _locked_column_merge, _logits_tile,  # noqa: F401
                     _lse_merge_kernel, _shifted_state, _similarity_tile, with_default_first)

# Tile configurations; block_d counts 16-bit elements (fp32 uses half: same bytes). A 128 x 128 S
# tile holds the fp32 accumulator in 64 registers per thread at 8 warps. Forward lists use BLOCK_D = 32
# with 4 stages where it saves registers (sm90: 175 against 255 for BLOCK_D = 64). Offline compiles
# (Triton 3.8, cuobjdump; benchmarks/kernel_report.py writes every figure to
# benchmarks/results/kernel_report.csv) find no spills in the default of each list; some non-default
# configs do spill (the report lists them), and autotuning simply finds them slower.
# With EVEN_N the G stores compile to STG.E.128 (16 bytes), otherwise to STG.E.U16.
# Shared memory stays under the ~100 KB of sm86/89 for the sm80 list (stages x (BM + BN) x BD x 2 B).
# The interpreter config is large: its cost is per tile operation, not per element.

# Every tile config a launcher may take (FASTCLIP_AUTOTUNE=1 times them all), 128 x 128 first.
FWD_TILE_CONFIGS = {
    "sm90": (TileConfig(128, 128, 32, 8, 4), TileConfig(128, 128, 64, 8, 3), TileConfig(128, 64, 64, 4, 4),
             TileConfig(64, 128, 64, 4, 4), TileConfig(64, 64, 64, 4, 3)),
    "sm80": (TileConfig(128, 128, 32, 8, 4), TileConfig(128, 64, 32, 4, 4), TileConfig(64, 128, 32, 4, 4),
             TileConfig(128, 128, 64, 8, 3), TileConfig(64, 64, 64, 4, 3)),
    "interpreter": (TileConfig(64, 64, 128, 4, 1),),
}
BWD_TILE_CONFIGS = {
    "sm90": (TileConfig(128, 128, 64, 8, 3), TileConfig(128, 128, 32, 8, 4), TileConfig(128, 64, 64, 4, 4),
             TileConfig(64, 128, 64, 4, 4), TileConfig(64, 64, 64, 4, 3)),
    "sm80": FWD_TILE_CONFIGS["sm80"],
    "interpreter": FWD_TILE_CONFIGS["interpreter"],
}


# CLIP defaults: tiles that run 2 (forward) and 3 (backward) CTAs per SM without spilling, so one CTA's
# exp/store epilogue hides behind another's MMA. The backward's log-softmax d-scale sum needs both
# the logits and G live: every 128-wide backward tile spills there (kernel report: 16-56 STL/LDL),
# 64 x 64 takes ~150 registers. The choice follows the report's roofline model
# (python benchmarks/kernel_report.py), not a GPU measurement. Its L2 term (issue 16) keeps them: the
# 128-wide backward tiles spill, and a 128 x 128 forward (1 CTA/SM) pays more in its serial epilogue
# than it saves in L2 bytes; only a resident row block (modelled, not implemented) would go lower.
# Forward defaults: 64 x 128 x 32, which compiles without spills on Triton 3.6 (the oldest supported,
# the GPU image's) and 3.8 for both archs; 64 x 128 x 64 (sm90's default before) spills on 3.6 (9-16
# STL/LDL) though not on 3.8. Offline compiles, benchmarks/kernel_report.py in each Triton.
CLIP_FWD_CONFIGS = with_default_first(FWD_TILE_CONFIGS, {"sm90": TileConfig(64, 128, 32, 4, 4),
                                               "sm80": TileConfig(64, 128, 32, 4, 4)})
# With expectations the shifted logits of both directions stay live beside the logits. Every 4-warp
# tile of the lists spills on Triton 3.6 (64 x 64: 20-34 STL/LDL); 64 x 64 at 8 warps does not, on
# 3.6 (192-233 registers) or 3.8 (114-181), at 1 CTA of 8 warps per SM (2 on sm90 with 3.8's flag set
# for the deterministic merge).
CLIP_FWD_EXPECTATION_CONFIGS = with_default_first(CLIP_FWD_CONFIGS, {"sm90": TileConfig(64, 64, 64, 8, 3),
                                                           "sm80": TileConfig(64, 64, 64, 8, 3)})
CLIP_BWD_CONFIGS = with_default_first(BWD_TILE_CONFIGS, {"sm90": TileConfig(64, 64, 64, 4, 3),
                                               "sm80": TileConfig(64, 64, 64, 4, 3)})
# Sizes and offsets change from call to call (do_not_specialize): one compiled kernel per dtype and
# flag set, not one per batch size. Strides and D stay specialised (16-divisibility -> vector loads).


@triton.heuristics({"EVEN_D": lambda args: args["dim"] % args["BLOCK_D"] == 0})
@triton.jit(do_not_specialize=["n_rows", "n_cols", "tiles_per_split", "positive_offset"])
def _clip_loss_fwd_kernel(
        image_ptr, text_ptr, scale_ptr, bias_ptr,
        row_max_ptr, row_sum_ptr, row_wsum_ptr,
        col_max_ptr, col_sum_ptr, col_wsum_ptr, col_lock_ptr, positive_ptr,
        n_rows, n_cols, dim, tiles_per_split, positive_offset,
        stride_image_row, stride_image_dim, stride_text_row, stride_text_dim,
        HAS_EXPECTATIONS: tl.constexpr, LOCKED_COLUMNS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Row and column softmax statistics of S from ONE computation of each tile.

    Math (S = scale * x + bias, x = I_i . T_j):
      rows:    online over the program's column tiles, m_i = max_j S_ij, l_i = sum_j exp(S_ij - m_i),
               w_i = sum_j exp(S_ij - m_i) (S_ij - m_i) (only with HAS_EXPECTATIONS);
      columns: per tile, c_j = max_i S_ij, s_j = sum_i exp(S_ij - c_j),
               v_j = sum_i exp(S_ij - c_j) (S_ij - c_j).
      positives: S_i,i+positive_offset as this tile rounded it, stored to positive_ptr[i] by the
               tile the band j = i + offset crosses (the local loss's d/d scale subtracts it from
               E[log p] + lse, so it must be the very value the tile summed; a separate dot of the
               features misses by ~|S| eps, amplified by the cancellation; issue 18).
    The weighted sums are in log form (shifted logits, not x): the merge finalises them to
    E[log p] = w / l - log l, from which the local loss's d/d scale is (E[log p] + CE) / scale with
    no |S|-sized cancellation (E[x] - x_ii would lose ~|x| eps per merge; issue 18).
    Natural units on purpose: S - max is formed before any base change, so the exponent's rounding
    is relative to the small difference, not to |S| ~ 30 (base-2 logits cost ~3x the LSE error).
    Tiling: grid (cdiv(n_rows, BLOCK_M), n_splits). Program (pid_m, pid_s) owns BLOCK_M rows and the
    column tiles [pid_s * tiles_per_split, +tiles_per_split) (the last split may have fewer); each
    tile's x is one D-looped dot (_similarity_tile). Splitting the columns keeps the GPU full when the row block count
    is small (a rank's local rows against the global columns).
    Saved: row partials at [pid_s, row] of (n_splits, n_rows) arrays, merged by _lse_merge_kernel.
    Columns, deterministic (LOCKED_COLUMNS=False): partials at [pid_m, col] of (cdiv(n_rows, BLOCK_M),
    n_cols) arrays, merged by _lse_merge_kernel in a fixed order (bitwise repeatable, a workspace of
    row blocks x n_cols). LOCKED_COLUMNS=True: each tile's partial is merged at once into a running
    (max, sum, weighted sum) = (col_max_ptr, col_sum_ptr, col_wsum_ptr) of n_cols each, under one
    lock per column tile (col_lock_ptr), with no workspace; one O(n_cols) finalise pass follows.
    Programs walk their column tiles starting at pid_m, so those working at the same time mostly
    hold different locks. Nothing B x B is written.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows, row_valid = _block_range(pid_m, n_rows, BLOCK_M)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    row_wsum = tl.zeros((BLOCK_M,), tl.float32)
    first_tile = pid_s * tiles_per_split
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(n_cols, BLOCK_N) - first_tile)  # this split's tiles
    col_partial_base = pid_m.to(tl.int64) * n_cols
    # The trip count is the launcher's integer, the same for every program (no count derived from
    # program_id). Steps past this split's n_tiles (the last split only) map to a tile past n_cols:
    # every column masked, nothing merged.
    for step in range(0, tiles_per_split):
        tile = tl.where(step < n_tiles, (step + pid_m) % n_tiles, step) if LOCKED_COLUMNS else step
        col_block = first_tile + tile
        cols, col_valid = _block_range(col_block, n_cols, BLOCK_N)
        x = _similarity_tile(image_ptr, text_ptr, rows, cols, row_valid, col_valid, dim,
                             stride_image_row, stride_image_dim, stride_text_row, stride_text_dim,
                             BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION, UPCAST_DOT)
        logits = tl.where(row_valid[:, None] & col_valid[None, :], x * scale + bias, float("-inf"))
        # Positives, only in the tiles the band j = i + offset crosses: one select and row sum there.
        band_start = pid_m * BLOCK_M + positive_offset
        if (col_block * BLOCK_N < band_start + BLOCK_M) & (col_block * BLOCK_N + BLOCK_N > band_start):
            is_positive = (cols[None, :] == rows[:, None] + positive_offset) & col_valid[None, :]
            tl.store(positive_ptr + rows, tl.sum(tl.where(is_positive, logits, 0.0), axis=1),
                     mask=row_valid & (tl.sum(is_positive.to(tl.int32), axis=1) > 0))

        # Rows: online softmax over this program's column tiles.
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # padded rows stay at 0, not NaN
        row_shifted = logits - safe_max[:, None]
        p = tl.exp(row_shifted)
        row_sum, row_wsum = _shifted_state(row_max, row_sum, row_wsum, new_max, HAS_EXPECTATIONS)
        row_sum += tl.sum(p, axis=1)
        if HAS_EXPECTATIONS:  # p (S - m); a masked entry's -inf is floored so that p = 0 times it is 0
            row_wsum += tl.sum(p * tl.maximum(row_shifted, -3.0e38), axis=1)
        row_max = new_max

        # Columns: this tile's partial, shifted by its own column max.
        tile_col_max = tl.max(logits, axis=0)
        safe_col_max = tl.where(tile_col_max == float("-inf"), 0.0, tile_col_max)
        col_shifted = logits - safe_col_max[None, :]
        q = tl.exp(col_shifted)
        tile_col_sum = tl.sum(q, axis=0)
        tile_col_wsum = tl.sum(q * tl.maximum(col_shifted, -3.0e38), axis=0) if HAS_EXPECTATIONS else tile_col_sum
        if LOCKED_COLUMNS:
            _locked_column_merge(col_lock_ptr + col_block, col_max_ptr, col_sum_ptr, col_wsum_ptr, cols, col_valid,
                                 tile_col_max, tile_col_sum, tile_col_wsum, HAS_EXPECTATIONS)
        else:
            col_offsets = col_partial_base + cols
            tl.store(col_max_ptr + col_offsets, tile_col_max, mask=col_valid)
            tl.store(col_sum_ptr + col_offsets, tile_col_sum, mask=col_valid)
            if HAS_EXPECTATIONS:
                tl.store(col_wsum_ptr + col_offsets, tile_col_wsum, mask=col_valid)

    row_offsets = pid_s.to(tl.int64) * n_rows + rows
    tl.store(row_max_ptr + row_offsets, row_max, mask=row_valid)
    tl.store(row_sum_ptr + row_offsets, row_sum, mask=row_valid)
    if HAS_EXPECTATIONS:
        tl.store(row_wsum_ptr + row_offsets, row_wsum, mask=row_valid)


@triton.heuristics({
    "EVEN_D": lambda args: args["dim"] % args["BLOCK_D"] == 0,
    # Whole column tiles: G's stores need no column mask, so each thread's run of 8 contiguous 16-bit
    # G values is one 16-byte store (n_cols is not specialised, so the compiler cannot see this itself).
    "EVEN_N": lambda args: args["n_cols"] % args["BLOCK_N"] == 0,
    "HAS_POSITIVES": lambda args: args["positive_offset"] < args["n_cols"]
    and args["positive_offset"] + args["n_rows"] > 0,
})
@triton.jit(do_not_specialize=["n_rows", "n_cols", "positive_offset"])
def _clip_loss_bwd_kernel(
        image_ptr, text_ptr, scale_ptr, bias_ptr, row_lse_ptr, col_lse_ptr, row_coef_ptr, col_coef_ptr,
        grad_multiplier_ptr, grad_logits_ptr, scale_partial_ptr,
        n_rows, n_cols, dim, positive_offset,
        stride_image_row, stride_image_dim, stride_text_row, stride_text_dim, stride_grad_row,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, HAS_POSITIVES: tl.constexpr):
    """G = dL/dS for a chunk of rows against all columns, times a storage multiplier.

    Math: with P = exp(S - row_lse) (row softmax), Q = exp(S - col_lse) (column softmax) and the
    positives j = i + positive_offset,
        G_ij = row_coef_i (P_ij - [pos]) + col_coef_j (Q_ij - [pos]),
    stored as G * grad_multiplier in grad_logits' dtype (the input dtype). The multiplier (set by the
    launcher: 1 / max|coef|, times 2^8 for fp16) keeps G in the normal range of fp16/bf16 even when
    the coefficients are ~1/B; the GEMMs' result is scaled back by scale / multiplier.
    d scale: with R = row_coef (P - [pos]) and C = col_coef (Q - [pos]) (G = R + C),
        sum_ij G_ij x_ij = (1 / scale) sum_ij (R_ij log P_ij + C_ij log Q_ij),
    because S - log P = row_lse is constant along a row and R's rows sum to zero there (each row
    softmax sums to one; likewise C's columns), so the identity holds for the sum over every block of
    S, which is what the callers add up. Why the logs: near a positive the terms of sum G (S - bias)
    are ~|S| and cancel, and the fp32 log-sum-exps' rounding (~|S| eps) leaves sum_j P_ij off 1 by as
    much, which that form multiplies by |S|; this one multiplies it by the small entropy. Each
    program writes its tile's sum (times the multiplier); the launcher adds them in a fixed order.
    Tiling: grid (cdiv(n_rows, BLOCK_M), cdiv(n_cols, BLOCK_N)), one S tile per program, D looped.
    Saved: nothing; G is a transient workspace of at most FASTCLIP_WORKSPACE_MB, consumed by two
    cuBLAS GEMMs (grad_image rows = G @ T, grad_text += G.T @ I_rows) before the next chunk; the
    d scale partials go to scale_partial[pid_m * n_col_tiles + pid_n].
    """
    rows, row_valid = _block_range(tl.program_id(0), n_rows, BLOCK_M)
    cols, col_valid = _block_range(tl.program_id(1), n_cols, BLOCK_N)
    logits = _logits_tile(image_ptr, text_ptr, scale_ptr, bias_ptr, rows, cols, row_valid, col_valid, dim,
                          stride_image_row, stride_image_dim, stride_text_row, stride_text_dim,
                          BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION, UPCAST_DOT)
    multiplier = tl.load(grad_multiplier_ptr).to(tl.float32)
    row_lse = tl.load(row_lse_ptr + rows, mask=row_valid, other=0.0)
    col_lse = tl.load(col_lse_ptr + cols, mask=col_valid, other=0.0)
    row_coef = tl.load(row_coef_ptr + rows, mask=row_valid, other=0.0) * multiplier
    col_coef = tl.load(col_coef_ptr + cols, mask=col_valid, other=0.0) * multiplier
    # log P and log Q: the exponents, kept for the scale gradient's sum below.
    row_log = logits - row_lse[:, None]
    col_log = logits - col_lse[None, :]
    row_part = row_coef[:, None] * tl.exp(row_log)
    col_part = col_coef[None, :] * tl.exp(col_log)
    if HAS_POSITIVES:
        positive = cols[None, :] == rows[:, None] + positive_offset
        row_part = tl.where(positive, row_part - row_coef[:, None], row_part)
        col_part = tl.where(positive, col_part - col_coef[None, :], col_part)
    valid = row_valid[:, None] & col_valid[None, :]
    scale_terms = tl.where(valid, row_part * row_log + col_part * col_log, 0.0)
    tl.store(scale_partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.sum(scale_terms, axis=1), axis=0))
    g = row_part + col_part
    out = grad_logits_ptr + rows.to(tl.int64)[:, None] * stride_grad_row + cols[None, :]
    if EVEN_N:
        tl.store(out, g.to(grad_logits_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        tl.store(out, g.to(grad_logits_ptr.dtype.element_ty), mask=valid)
