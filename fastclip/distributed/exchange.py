"""How a rank's rows meet every rank's columns: the "gather" and "ring" exchanges, for both losses.

Rank r holds b pairs (image rows I_r, text columns T_r); the global batch is B = W * b. Each rank
computes only its rows of S = scale * I @ T_all.T (b x B), so every similarity entry is computed
once across ranks. Both exchanges call the primitives of the backend they were built with
(``backend.op(...)``, with the call's ``deterministic``) and nothing else, so every backend (torch,
triton, cuda) shares them.

GatherExchange: all-gather T (b x D -> B x D, in its dtype) forward and keep it for backward; one
primitive call over the b x B block; column log-sum-exps merged by two O(B)-float all-reduces
(MAX of the partial lse, then SUM of exp(partial - max)); text gradients reduce-scattered back
(B x D -> b x D, in the features' dtype). Saved: the gathered texts (B x D) and O(B) vectors.

RingExchange: the text blocks travel round the ring (``fastclip.distributed.ring``), the primitive
runs per b x b block under the transfer, column statistics and text gradients travel back to their
owner. Saved: the local inputs and O(b) vectors only; backward rings the blocks again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastclip.distributed.comm import World, all_gather_rows, all_reduce_, reduce_scatter_rows
from fastclip.distributed.ring import Ring
from fastclip.ops.chunking import merge_lse
from fastclip.ops.clip_loss import pair_losses


@dataclass
class ColumnStats:
    """CLIP forward statistics on rank r, each over the *global* batch.

    row_lse, row_expect: (b,) for the local rows; col_lse, col_expect: (b,) for the local columns
    (expected log-probabilities E[log P] under the row / column softmax, only when asked); pair_loss_total:
    sum of every rank's per-pair losses (only when ``diagonal`` was given); saved: exchange state
    for backward.
    """

    row_lse: torch.Tensor
    col_lse: torch.Tensor
    row_expect: torch.Tensor | None
    col_expect: torch.Tensor | None
    pair_loss_total: torch.Tensor | None
    saved: tuple


@dataclass
class GradientPass:
    """One backward primitive sweep: G_ij = row_coef_i (P_ij - [pos]) + col_coef_j (Q_ij - [pos]).

    row_coef: (b,) for the local rows. col_coef: 0-dim (the same for every column of every rank)
    or (b,) for this rank's own columns, which the exchange delivers to the ranks that need them.
    image / text: whether this sweep's grad_image / grad_text are kept.
    """

    row_coef: torch.Tensor
    col_coef: torch.Tensor
    image: bool
    text: bool


def merge_packed_lse(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Merge packed (k, n) statistics: row 0 a log-sum-exp, row 1 (if any) an expectation under it."""
    with_expect = first.shape[0] > 1
    lse, expect = merge_lse(first[0], first[1] if with_expect else None, second[0], second[1] if with_expect else None)
    return torch.stack([lse, expect]) if with_expect else lse[None]


def _accumulate(total, part):
    return part if total is None else total + part


class _Exchange:
    """What both exchanges hold: the ranks, and the backend whose primitives run each block."""

    def __init__(self, world: World, backend, deterministic: bool = False):
        self.world, self.backend, self.deterministic = world, backend, deterministic

    def op(self, op_name: str):
        return self.backend.op(op_name)


class GatherExchange(_Exchange):
    name = "gather"

    def _own(self, b: int) -> slice:
        return slice(self.world.rank * b, (self.world.rank + 1) * b)

    def clip_columns(self, image, text, scale, bias, diagonal, with_expectations) -> ColumnStats:
        world, b = self.world, image.shape[0]
        texts = all_gather_rows(world, text)
        row_lse, col_partial, row_expect, col_expect_partial = self.op("clip_loss").clip_loss_fwd(
            image, texts, scale, bias, with_expectations, self.deterministic)
        col_max = all_reduce_(world, col_partial.clone(), dist.ReduceOp.MAX)
        weight = (col_partial - col_max).exp()
        pieces = [weight]
        if with_expectations:  # E[log q] merged as in fastclip.ops.chunking.merge_lse: terms <= 0
            pieces.append(torch.where(weight > 0, weight * (col_expect_partial + (col_partial - col_max)), 0.0))
        if diagonal is not None:
            # sum_all loss_i = 1/2 [sum_i (row_lse_i - 2 S_ii) + sum_j col_lse_j]: the row part rides along
            pieces.append((row_lse - 2.0 * diagonal).sum().reshape(1))
        packed = all_reduce_(world, torch.cat(pieces))
        n = texts.shape[0]
        col_sum = packed[:n]
        col_lse = col_max + col_sum.log()
        own = self._own(b)
        col_expect = packed[n:2 * n][own] / col_sum[own] - col_sum[own].log() if with_expectations else None
        total = (0.5 * (packed[-1] + col_lse.sum())).clamp_min(0.0) if diagonal is not None else None  # a CE >= 0
        return ColumnStats(row_lse, col_lse[own], row_expect if with_expectations else None, col_expect, total,
                           (texts, col_lse))

    def clip_gradients(self, image, text, scale, bias, row_lse, saved, passes, want_text):
        """(grad_image (b, D) fp32, grad_text (b, D) fp32 summed over every rank's rows or None, and
        sum_ij G_ij x_ij over this rank's rows, summed over the passes)."""
        texts, col_lse = saved
        b = image.shape[0]
        grad_image = grad_texts = grad_scale = None
        for sweep in passes:
            if sweep.col_coef.dim() == 0:
                col_coef = sweep.col_coef.expand(texts.shape[0]).contiguous()
            else:
                col_coef = all_gather_rows(self.world, sweep.col_coef)
            part_image, part_texts, part_scale = self.op("clip_loss").clip_loss_bwd(
                image, texts, scale, bias, row_lse, col_lse, sweep.row_coef, col_coef, self.world.rank * b,
                self.deterministic)
            grad_scale = _accumulate(grad_scale, part_scale)
            if sweep.image:
                grad_image = _accumulate(grad_image, part_image)
            if sweep.text:
                grad_texts = _accumulate(grad_texts, part_texts)
        grad_text = None
        if want_text:
            grad_text = reduce_scatter_rows(self.world, grad_texts.to(text.dtype)).to(grad_texts.dtype)
        return grad_image, grad_text, grad_scale

    def siglip_sum(self, image, text, scale, bias):
        texts = all_gather_rows(self.world, text)
        offset = self.world.rank * image.shape[0]  # positives: the rank's own block of columns
        loss_sum = self.op("siglip_loss").siglip_loss_fwd(image, texts, scale, bias, offset, self.deterministic)
        return loss_sum, (texts,)

    def siglip_gradients(self, image, text, scale, bias, saved, grad_coef, want_text):
        (texts,) = saved
        offset = self.world.rank * image.shape[0]
        grad_image, grad_texts, grad_bias = self.op("siglip_loss").siglip_loss_bwd(
            image, texts, scale, bias, offset, grad_coef, self.deterministic)
        grad_text = None
        if want_text:
            grad_text = reduce_scatter_rows(self.world, grad_texts.to(text.dtype)).to(grad_texts.dtype)
        return grad_image, grad_text, grad_bias


class RingExchange(_Exchange):
    name = "ring"

    def __init__(self, world: World, backend, deterministic: bool = False):
        super().__init__(world, backend, deterministic)
        self.ring = Ring(world)

    def _offset(self, owner: int, b: int) -> int:
        """Positives only in the rank's own block; b is past the last column of any other block."""
        return 0 if owner == self.world.rank else b

    def clip_columns(self, image, text, scale, bias, diagonal, with_expectations) -> ColumnStats:
        row_stats = None

        def visit(owner, block):
            nonlocal row_stats
            row_lse, col_lse, row_expect, col_expect = self.op("clip_loss").clip_loss_fwd(
                image, block[0], scale, bias, with_expectations, self.deterministic)
            rows = torch.stack([row_lse, row_expect]) if with_expectations else row_lse[None]
            row_stats = rows if row_stats is None else merge_packed_lse(row_stats, rows)
            return [torch.stack([col_lse, col_expect]) if with_expectations else col_lse[None]]

        (col_stats,) = self.ring.run([text], visit, lambda received, local: [merge_packed_lse(received[0], local[0])],
                                     wire_dtypes=[scale.dtype])
        row_lse, col_lse = row_stats[0].contiguous(), col_stats[0].contiguous()
        total = None
        if diagonal is not None:
            total = all_reduce_(self.world, pair_losses(row_lse, col_lse, diagonal).sum())
        return ColumnStats(row_lse, col_lse, row_stats[1] if with_expectations else None,
                           col_stats[1] if with_expectations else None, total, (col_lse,))

    def clip_gradients(self, image, text, scale, bias, row_lse, saved, passes, want_text):
        (col_lse,) = saved
        b = image.shape[0]
        # What travels with each text block: its columns' global lse and the owner's column coefficients.
        column_info = torch.stack([col_lse] + [sweep.col_coef for sweep in passes if sweep.col_coef.dim() == 1])
        grad_image = torch.zeros(image.shape, dtype=row_lse.dtype, device=image.device)
        grad_scale = torch.zeros((), dtype=row_lse.dtype, device=image.device)

        def visit(owner, block):
            block_text, block_info = block
            grad_block, slot = None, 1
            for sweep in passes:
                if sweep.col_coef.dim() == 0:
                    col_coef = sweep.col_coef.expand(b).contiguous()
                else:
                    col_coef, slot = block_info[slot], slot + 1
                part_image, part_text, part_scale = self.op("clip_loss").clip_loss_bwd(
                    image, block_text, scale, bias, row_lse, block_info[0], sweep.row_coef, col_coef,
                    self._offset(owner, b), self.deterministic)
                grad_scale.add_(part_scale)
                if sweep.image:
                    grad_image.add_(part_image)
                if sweep.text:
                    grad_block = _accumulate(grad_block, part_text)
            return [grad_block] if want_text else None

        routed = self.ring.run([text, column_info], visit, _add_received, wire_dtypes=[text.dtype])
        return grad_image, routed[0] if want_text else None, grad_scale

    def siglip_sum(self, image, text, scale, bias):
        b = image.shape[0]
        total = torch.zeros((), dtype=scale.dtype, device=image.device)

        def visit(owner, block):
            total.add_(self.op("siglip_loss").siglip_loss_fwd(image, block[0], scale, bias, self._offset(owner, b),
                                                              self.deterministic))
            return None

        self.ring.run([text], visit)
        return total, ()

    def siglip_gradients(self, image, text, scale, bias, saved, grad_coef, want_text):
        b = image.shape[0]
        grad_image = torch.zeros(image.shape, dtype=scale.dtype, device=image.device)
        grad_bias = torch.zeros((), dtype=scale.dtype, device=image.device)

        def visit(owner, block):
            part_image, part_text, part_bias = self.op("siglip_loss").siglip_loss_bwd(
                image, block[0], scale, bias, self._offset(owner, b), grad_coef, self.deterministic)
            grad_image.add_(part_image)
            grad_bias.add_(part_bias)
            return [part_text] if want_text else None

        routed = self.ring.run([text], visit, _add_received, wire_dtypes=[text.dtype])
        return grad_image, routed[0] if want_text else None, grad_bias


def _add_received(received, local):
    return [incoming.to(mine.dtype) + mine for incoming, mine in zip(received, local)]


EXCHANGES = {"gather": GatherExchange, "ring": RingExchange}
