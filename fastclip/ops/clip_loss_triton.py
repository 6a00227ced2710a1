"""Triton launchers of the CLIP loss primitives: the signatures and semantics of clip_loss_torch.py.

With S = scale * image @ text.T + bias over a block of rows (image, b x D) and columns (text, n x D):

    clip_loss_fwd -> (row_lse (b,), col_lse (n,) partial over these rows, row_expect, col_expect)
                     (expectations of the log-probabilities, E[log P] = -entropy, as clip_loss_torch.py)
    clip_loss_bwd -> (grad_image (b, D), grad_text (n, D), grad_scale ()), fp32, for
                     G_ij = row_coef_i (P_ij - [pos]) + col_coef_j (Q_ij - [pos]),  pos: j = i + positive_offset
                     (grad_scale: the block's share of d/d scale, defined in fastclip/ops/__init__.py)

Equivalent plain PyTorch (materialising S, which this never does)::

    S = scale * image @ text.T + bias
    row_lse, col_lse = S.logsumexp(1), S.logsumexp(0)
    G = row_coef[:, None] * (S - row_lse[:, None]).exp() + col_coef * (S - col_lse).exp()  # minus positives
    grad_image, grad_text = scale * G @ text, scale * G.T @ image

Forward: one kernel pass computes each S tile once and feeds both softmax directions (kernels/
clip_loss.py). Column statistics:
    deterministic=False (the default)  each tile's column partial is merged at once into a running
        (max, sum, weighted sum) under a per-column-tile lock: no workspace, and one O(n) pass
        finalises it exactly as the deterministic merge does (as accurate); the merge order follows
        the programs' timing, so the last bits vary from run to run on a GPU.
    deterministic=True  partials per row block go to a workspace bounded by FASTCLIP_WORKSPACE_MB
        (rows in chunks if needed) and are merged in a fixed order: bitwise repeatable, and the
        forward statistics are bitwise the same for every workspace size.
Row statistics are merged in a fixed order either way. Backward (always bitwise repeatable): per
row chunk, a kernel writes G (input dtype, bounded workspace), then two cuBLAS GEMMs consume it.
scale and bias stay on the device (no host sync).
"""
from __future__ import annotations

import torch

from fastclip.kernels.clip_loss import (CLIP_BWD_CONFIGS, CLIP_FWD_CONFIGS, CLIP_FWD_EXPECTATION_CONFIGS,
                                        _clip_loss_bwd_kernel, _clip_loss_fwd_kernel)
from fastclip.kernels.common import _lse_merge_kernel, merge_block
from fastclip.ops import triton_common as common
from fastclip.ops.output_shapes import clip_stats_like, gradients_like

MERGE_PROGRAMS_PER_SM = 4


def _forward(image, text, scale, bias, with_expectations: bool, locked_columns: bool, config):
    n_rows, dim = image.shape
    n_cols = text.shape[0]
    device, fp32 = image.device, torch.float32
    n_stats = 3 if with_expectations else 2
    row_lse = common.allocate((n_rows,), fp32, device)
    col_lse = common.allocate((n_cols,), fp32, device)
    row_expect = common.allocate((n_rows if with_expectations else 0,), fp32, device)
    col_expect = common.allocate((n_cols if with_expectations else 0,), fp32, device)
    block_m = config.block_m
    # Splits from all rows, not per chunk: the statistics then do not depend on the workspace size.
    splits, tiles_per_split = common.column_splits(common.cdiv(n_rows, block_m), n_cols, config.block_n, device)
    if locked_columns:  # a running (max, sum, weighted sum) under per-tile locks: O(n_cols), one chunk
        chunk = n_rows
        running = [common.allocate((n_cols,), fp32, device) for _ in range(n_stats)]
        running[0].fill_(float("-inf"))
        for state in running[1:]:
            state.zero_()
        running += running[:1] * (3 - n_stats)
        # One lock per column tile, and one for each step of the last split past n_cols (all masked).
        locks = common.allocate((splits * tiles_per_split,), torch.int32, device).zero_()
        col_args = running + [locks]
    else:
        chunk = common.rows_per_chunk(n_rows, bytes_per_block=4 * n_stats * n_cols, block_rows=block_m,
                                      elements_per_block=n_cols)
        col_parts = [common.allocate((common.cdiv(chunk, block_m), n_cols), fp32, device) for _ in range(n_stats)]
        col_parts += col_parts[:1] * (3 - n_stats)  # an unused pointer when there are no expectations
        running = ([common.allocate((n_cols,), fp32, device) for _ in range(n_stats)] if chunk < n_rows
                   else [col_lse] * n_stats)  # unused pointers for a single chunk
        running += running[:1] * (3 - n_stats)
        col_args = col_parts + col_parts[:1]  # the lock pointer is unused
    options = common.launch_options(config, image.dtype, dim)
    for index, start in enumerate(range(0, n_rows, chunk)):
        rows = min(chunk, n_rows - start)
        blocks = common.cdiv(rows, block_m)
        row_parts = [common.allocate((splits, rows), fp32, device) for _ in range(n_stats)]
        row_parts += row_parts[:1] * (3 - n_stats)
        image_rows = image[start:start + rows]
        _clip_loss_fwd_kernel[(blocks, splits)](
            image_rows, text, scale, bias, *row_parts, *col_args,
            rows, n_cols, dim, tiles_per_split,
            image_rows.stride(0), image_rows.stride(1), text.stride(0), text.stride(1),
            HAS_EXPECTATIONS=with_expectations, LOCKED_COLUMNS=locked_columns, **options)
        row_expect_out = row_expect[start:start + rows] if with_expectations else row_lse
        _merge(row_parts, splits, rows, row_parts, row_lse[start:start + rows], row_expect_out,
               has_running=False, finalize=True, with_expectations=with_expectations)
        if not locked_columns:
            _merge(col_parts, blocks, n_cols, running, col_lse, col_expect if with_expectations else col_lse,
                   has_running=index > 0, finalize=start + rows >= n_rows, with_expectations=with_expectations)
    if locked_columns:  # the one finalise pass: lse = m + log l, E[log q] = w / l - log l
        _merge(running, 0, n_cols, running, col_lse, col_expect if with_expectations else col_lse,
               has_running=True, finalize=True, with_expectations=with_expectations)
    return row_lse, col_lse, row_expect, col_expect


def _merge_programs(device: torch.device) -> int:
    """Programs the merge kernel should have: a few per SM (its loop over parts is latency-bound)."""
    return 2 if device.type != "cuda" else MERGE_PROGRAMS_PER_SM * common._multiprocessors(device.index or 0)


def _merge(parts, n_parts, length, running, lse, expect, *, has_running, finalize, with_expectations):
    """_lse_merge_kernel over ``length`` indices: n_parts rows of ``parts`` (stride length) into lse/expect."""
    block = merge_block(length, _merge_programs(lse.device))
    _lse_merge_kernel[(common.cdiv(length, block),)](
        *parts, n_parts, length, length, *running, lse, expect,
        HAS_RUNNING=has_running, FINALIZE=finalize, HAS_EXPECTATIONS=with_expectations, BLOCK=block)


def _backward(image, text, scale, bias, stats: tuple, positive_offset: int, config):
    """stats: (row_lse, col_lse, row_coef, col_coef) of clip_loss_bwd."""
    row_lse, col_lse, row_coef, col_coef = stats
    n_cols, dim = text.shape
    headroom = common.FP16_HEADROOM if image.dtype == torch.float16 else 1.0
    coef_norm = torch.maximum(row_coef.abs().amax(), col_coef.abs().amax()).float().clamp_min(1e-30)
    multiplier = headroom / coef_norm  # 0-dim, on the device: no host sync
    row_lse, col_lse = row_lse.contiguous(), col_lse.contiguous()
    row_coef, col_coef = row_coef.float().contiguous(), col_coef.float().contiguous()
    options = common.launch_options(config, image.dtype, dim)

    def write_chunk(start, rows, image_rows, grad_rows, tile_sums):
        _clip_loss_bwd_kernel[(common.cdiv(rows, config.block_m), common.cdiv(n_cols, config.block_n))](
            image_rows, text, scale, bias, row_lse[start:start + rows], col_lse,
            row_coef[start:start + rows], col_coef, multiplier, grad_rows, tile_sums,
            rows, n_cols, dim, positive_offset + start,
            image_rows.stride(0), image_rows.stride(1), text.stride(0), text.stride(1), grad_rows.stride(0),
            **options)

    grad_image, grad_text, scale_share = common.chunked_backward(image, text, config, write_chunk)
    undo = coef_norm / headroom
    grad_scale = scale_share * undo / scale.float()
    undo = undo * scale.float()
    return grad_image.mul_(undo), grad_text.mul_(undo), grad_scale


@torch.library.custom_op("fastclip::clip_loss_fwd_triton", mutates_args=())
def clip_loss_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  with_expectations: bool,
                  deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """image: (b, D), text: (n, D) fp32/fp16/bf16; scale, bias: 0-dim fp32 -> four fp32 vectors."""
    common.check_inputs(image, text, scale, bias)
    key = (common.shape_key(image, text), with_expectations, deterministic)
    configs = CLIP_FWD_EXPECTATION_CONFIGS if with_expectations else CLIP_FWD_CONFIGS
    locked = not deterministic
    config = common.choose_config("clip_loss_fwd", configs, image.device, key,
                                  lambda cfg: _forward(image, text, scale, bias, with_expectations, locked, cfg))
    return _forward(image, text, scale, bias, with_expectations, locked, config)


@clip_loss_fwd.register_fake
def _(image, text, scale, bias, with_expectations, deterministic):
    return clip_stats_like(image, text, with_expectations, torch.float32)


@torch.library.custom_op("fastclip::clip_loss_bwd_triton", mutates_args=())
def clip_loss_bwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  row_lse: torch.Tensor, col_lse: torch.Tensor, row_coef: torch.Tensor, col_coef: torch.Tensor,
                  positive_offset: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_image (b, D), grad_text (n, D), grad_scale ()) in fp32; row_*: (b,), col_*: (n,) fp32."""
    common.check_inputs(image, text, scale, bias, row_lse, col_lse, row_coef, col_coef)
    stats = (row_lse, col_lse, row_coef, col_coef)
    config = common.choose_config("clip_loss_bwd", CLIP_BWD_CONFIGS, image.device, common.shape_key(image, text),
                                  lambda cfg: _backward(image, text, scale, bias, stats, positive_offset, cfg))
    return _backward(image, text, scale, bias, stats, positive_offset, config)


@clip_loss_bwd.register_fake
def _(image, text, scale, bias, row_lse, col_lse, row_coef, col_coef, positive_offset, deterministic):
    return gradients_like(image, text, torch.float32)
