"""Triton kernels of the SigLIP loss: fused forward sum, semi-fused backward.

    _siglip_loss_fwd_kernel   sum_ij softplus(-y_ij S_ij) per program, S = scale * I @ T.T + bias
    _siglip_loss_bwd_kernel   G = sigmoid(S) - [pos] for a row chunk (rescaled, input dtype) + sum G

The launchers (fastclip/ops/siglip_loss_triton.py) sum the per-program partials in a fixed order
and run the two backward GEMMs (dI = c s G T, dT = c s G^T I) on cuBLAS from the G workspace, for the
same reasons as the CLIP backward (see kernels/clip_loss.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .clip_loss import BWD_TILE_CONFIGS, FWD_TILE_CONFIGS
from .common import TileConfig, with_default_first, _block_range, _log1p, _logits_tile, _similarity_tile

# One exp + one log per element (forward) and one exp (backward): lighter than the CLIP tile. The
# same declared lists; defaults at 2 CTAs per SM without spilling (the kernel report's roofline model
# finds them fastest, so that one CTA's epilogue hides behind another's MMA; not measured on a GPU).
# The sm90 backward is 128 x 128 (8 warps, 118 registers, 2 CTAs/SM, no spill): with the model's L2
# term (benchmarks/roofline.py) a 64 x 128 tile's operand loads, B^2 D elt (1/64 + 1/128), take longer
# from L2 than its MMAs; 128 x 128 loads a third less (estimate 8.5 against 12.3 ms on H100).
SIGLIP_FWD_CONFIGS = with_default_first(FWD_TILE_CONFIGS, {"sm90": TileConfig(64, 128, 64, 4, 4),
                                                 "sm80": TileConfig(64, 128, 32, 4, 4)})
SIGLIP_BWD_CONFIGS = with_default_first(BWD_TILE_CONFIGS, {"sm90": TileConfig(128, 128, 64, 8, 3),
                                                 "sm80": TileConfig(128, 64, 32, 4, 4)})


@triton.heuristics({
    "EVEN_D": lambda args: args["dim"] % args["BLOCK_D"] == 0,
    "HAS_POSITIVES": lambda args: args["positive_offset"] < args["n_cols"]
    and args["positive_offset"] + args["n_rows"] > 0,
})
@triton.jit(do_not_specialize=["n_rows", "n_cols", "positive_offset", "tiles_per_split"])
def _siglip_loss_fwd_kernel(
        image_ptr, text_ptr, scale_ptr, bias_ptr, partial_ptr,
        n_rows, n_cols, dim, positive_offset, tiles_per_split,
        stride_image_row, stride_image_dim, stride_text_row, stride_text_dim,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        EVEN_D: tl.constexpr, HAS_POSITIVES: tl.constexpr):
    """Partial sums of softplus(-y S) = -log sigmoid(y S), y = +1 on j = i + positive_offset else -1.

    Math: z = -y S; softplus(z) = max(z, 0) + log1p(exp(-|z|)), exact for large |z| of either sign.
    Tiling: grid (cdiv(n_rows, BLOCK_M), n_splits); program (pid_m, pid_s) walks the column tiles
    [pid_s * tiles_per_split, +tiles_per_split) of BLOCK_N (a host count: no loop bound comes from
    program_id; tiles past n_cols are masked), summing each tile into per-row fp32
    totals (a second (BLOCK_M, BLOCK_N) accumulator beside the dot's would spill registers).
    Saved: one fp32 partial per program at partial[pid_m * n_splits + pid_s]; the launcher sums them
    in a fixed order (bitwise repeatable).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows, row_valid = _block_range(pid_m, n_rows, BLOCK_M)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    row_totals = tl.zeros((BLOCK_M,), tl.float32)
    for step in range(0, tiles_per_split):
        cols, col_valid = _block_range(pid_s * tiles_per_split + step, n_cols, BLOCK_N)
        x = _similarity_tile(image_ptr, text_ptr, rows, cols, row_valid, col_valid, dim,
                             stride_image_row, stride_image_dim, stride_text_row, stride_text_dim,
                             BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION, UPCAST_DOT)
        z = x * scale + bias
        if HAS_POSITIVES:
            z = tl.where(cols[None, :] == rows[:, None] + positive_offset, -z, z)
        softplus = tl.maximum(z, 0.0) + _log1p(tl.exp(-tl.abs(z)))
        row_totals += tl.sum(tl.where(row_valid[:, None] & col_valid[None, :], softplus, 0.0), axis=1)
    tl.store(partial_ptr + pid_m * tl.num_programs(1) + pid_s, tl.sum(row_totals, axis=0))


@triton.heuristics({
    "EVEN_D": lambda args: args["dim"] % args["BLOCK_D"] == 0,
    "EVEN_N": lambda args: args["n_cols"] % args["BLOCK_N"] == 0,  # unmasked columns: 16-byte G stores
    "HAS_POSITIVES": lambda args: args["positive_offset"] < args["n_cols"]
    and args["positive_offset"] + args["n_rows"] > 0,
})
@triton.jit(do_not_specialize=["n_rows", "n_cols", "positive_offset"])
def _siglip_loss_bwd_kernel(
        image_ptr, text_ptr, scale_ptr, bias_ptr, grad_multiplier_ptr, grad_logits_ptr, bias_partial_ptr,
        n_rows, n_cols, dim, positive_offset,
        stride_image_row, stride_image_dim, stride_text_row, stride_text_dim, stride_grad_row,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, HAS_POSITIVES: tl.constexpr):
    """G = sigmoid(S) - [pos] for a chunk of rows (= d softplus(-y S) / dS), and its per-tile sums.

    Math: negatives G = sigmoid(S); positives G = -sigmoid(-S) (never 1 - sigmoid(S), which cancels).
    Stored as G * grad_multiplier in grad_logits' dtype (2^8 for fp16 lifts sigmoid(-10) ~ 4.5e-5
    out of fp16's subnormals, 1 otherwise); the launcher scales the GEMMs by grad_coef * scale /
    multiplier. Tiling: grid (cdiv(n_rows, BLOCK_M), cdiv(n_cols, BLOCK_N)), one S tile per program.
    Saved: nothing; the fp32 tile sums of G go to bias_partial[pid_m * n_col_tiles + pid_n] for
    d logit_bias, summed by the launcher in a fixed order.
    """
    pid_m = tl.program_id(0)
    rows, row_valid = _block_range(pid_m, n_rows, BLOCK_M)
    cols, col_valid = _block_range(tl.program_id(1), n_cols, BLOCK_N)
    valid = row_valid[:, None] & col_valid[None, :]
    logits = _logits_tile(image_ptr, text_ptr, scale_ptr, bias_ptr, rows, cols, row_valid, col_valid, dim,
                          stride_image_row, stride_image_dim, stride_text_row, stride_text_dim,
                          BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION, UPCAST_DOT)
    multiplier = tl.load(grad_multiplier_ptr).to(tl.float32)
    g = 1.0 / (1.0 + tl.exp(-logits))
    if HAS_POSITIVES:
        positive = cols[None, :] == rows[:, None] + positive_offset
        g = tl.where(positive, -1.0 / (1.0 + tl.exp(logits)), g)
    g = tl.where(valid, g, 0.0)
    tl.store(bias_partial_ptr + pid_m * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(g, axis=1), axis=0))
    out = grad_logits_ptr + rows.to(tl.int64)[:, None] * stride_grad_row + cols[None, :]
    if EVEN_N:  # the row mask alone keeps each thread's 8 contiguous columns one vector store
        tl.store(out, (g * multiplier).to(grad_logits_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        tl.store(out, (g * multiplier).to(grad_logits_ptr.dtype.element_ty), mask=valid)
