"""open_clip's four ``local_loss`` x ``gather_with_grad`` conventions on top of an exchange.

Notation on rank r (b local pairs, B = W b, g_r = the upstream gradient of rank r's returned loss):
loss_i = 1/2 [(row_lse_i - S_ii) + (col_lse_i - S_ii)] with global log-sum-exps; L = mean over all
B pairs (the global-batch loss); L_r = mean over r's b pairs (open_clip's local loss).

Value on rank r
    local_loss=False: L  ("global objective": a sum over every rank's pairs)
    local_loss=True:  L_r ("local objective"); reduction="none" is the local objective too: the (b,)
                      per-pair losses of this rank, with global statistics.

Gradients on rank r, exactly what open_clip's autograd produces:
    gather_with_grad=True  (all_gather backward sums every rank's gradient into the owner)
        features: sum_r' g_r' d(loss of r')/dX_r   (= W dL/dX_r when every g = 1, either local_loss)
        scale:    g_r d(loss of r)/ds              (not communicated: dL/ds, or dL_r/ds)
    gather_with_grad=False, local_loss=False (the gathered copies carry no grad; the local slot does)
        features: g_r dL/dX_r                      (1/W of the above), scale: g_r dL/ds
    gather_with_grad=False, local_loss=True (no slot replaced: X_r only reaches its own logits)
        images:   g_r dL_r/dI_r through S[r rows, :] only (the row cross-entropies)
        texts:    g_r dL_r/dT_r through S[:, r columns] only (the column cross-entropies, all rows)
        scale:    g_r dL_r/ds (full)

How: the global objective runs one sweep with G0 = (kappa/2)(P + Q - 2[pos]) (kappa = 1/B for mean,
1 for sum), then one 2-float all-reduce gives sum_r g_r and the scale gradient
sum_ij G0_ij x_ij (each rank's rows contribute the backward primitive's grad_scale shares, which
add up to it over all ranks and blocks); gradients are scaled after.
The local objective weights pair i by c_i = g / b (or g_i for "none"): row_coef = c_i / 2 on the
local rows and col_coef_j = c_j / 2 on column j, delivered from its owner by the exchange; its scale
gradient needs d loss_i / ds = 1/2 [(E_P[x]_i - x_ii) + (E_Q[x]_i - x_ii)], computed as
1/2 [(E_P[log P]_i + CE^row_i) + (E_Q[log Q]_i + CE^col_i)] / s from the expected log-probabilities
the forward returns with the statistics (x = (S - lse + log P) / s along a row; no |S|-sized
cancellation, so within 2x open_clip's fp32 error: docs/numerics.md).
CLIP's gradient w.r.t. a shared bias is exactly 0 (softmax is shift invariant).
"""
from __future__ import annotations

import torch

from fastclip.distributed.comm import World, all_reduce_
from fastclip.distributed.exchange import GradientPass
from fastclip.devices import accumulate_dtype
from fastclip.ops.chunking import row_dots
from fastclip.ops.clip_loss import pair_logits, pair_losses, pair_weights, reduce_pairs
from fastclip.ops.options import ClipOptions


def _pair_scale_grads(image, text, scale, stats) -> torch.Tensor:
    """d loss_i / d scale = 1/2 [(E_P[x]_i - x_ii) + (E_Q[x]_i - x_ii)] for the (b,) local pairs.

    E_P[x] - x_ii = (E_P[log P] - log P_ii) / scale with log P_ii = S_ii - row_lse_i. Where the
    softmax sits on its positive this is a small difference of the tiles' S_ii and the diagonal's:
    the two must agree to better than ~|S| eps, and a diagonal from another summation order than
    the backend's tile GEMM misses by that much (~5x open_clip's error). So S_ii is taken exact, in
    fp64 from the (rounded) features, an O(b D) dot: the error left is the tiles' own, as in open_clip.
    """
    wide = torch.float64
    diagonal = row_dots(image.to(wide), text.to(wide)) * scale.to(wide)
    row_part = stats.row_expect.to(wide) + (stats.row_lse.to(wide) - diagonal)
    col_part = stats.col_expect.to(wide) + (stats.col_lse.to(wide) - diagonal)
    return (0.5 * (row_part + col_part) / scale.to(wide)).to(stats.row_lse.dtype)


class DistributedClip:
    """Forward and backward of ``ClipLossFunction`` across ranks (see the module docstring).

    options: the call's ``ClipOptions`` (local_loss, gather_with_grad and reduction are read here);
    exchange: a ``fastclip.distributed.exchange`` exchange built with the call's backend.
    """

    def __init__(self, world: World, exchange, options: ClipOptions):
        self.world, self.exchange, self.options = world, exchange, options
        self.local_loss, self.gather_with_grad = options.local_loss, options.gather_with_grad

    def global_objective(self) -> bool:
        return not self.local_loss and self.options.reduction != "none"

    def forward(self, image, text, scale, bias, want_scale_grad):
        """(value, tensors to save): the loss on this rank and what backward needs (O(b) vectors + exchange's)."""
        reduction = self.options.reduction
        global_objective = self.global_objective()
        with_expectations = want_scale_grad and not global_objective
        diagonal = pair_logits(image, text, scale)
        stats = self.exchange.clip_columns(image, text, scale, bias, diagonal if global_objective else None,
                                           with_expectations)
        if global_objective:
            total = stats.pair_loss_total
            value = total / (image.shape[0] * self.world.size) if reduction == "mean" else total
        else:
            value = reduce_pairs(pair_losses(stats.row_lse, stats.col_lse, diagonal), reduction)
        pair_scale_grad = None
        if with_expectations:
            pair_scale_grad = _pair_scale_grads(image, text, scale, stats)
        return value, (stats.row_lse, pair_scale_grad, *stats.saved)

    def backward(self, image, text, scale, bias, saved, grad_output, want_scale, want_text):
        """(grad_image, grad_text or None, grad_scale or None), fp32, for this rank's features."""
        reduction = self.options.reduction
        row_lse, pair_scale_grad, *exchange_saved = saved
        b, accumulate = image.shape[0], accumulate_dtype(image)
        run = lambda passes: self.exchange.clip_gradients(  # noqa: E731
            image, text, scale, bias, row_lse, exchange_saved, passes, want_text)
        if self.global_objective():
            kappa = 1.0 / (b * self.world.size) if reduction == "mean" else 1.0
            half = torch.full((), 0.5 * kappa, dtype=accumulate, device=image.device)
            grad_image, grad_text, partial_scale = run([GradientPass(half.expand(b).contiguous(), half, image=True,
                                                                     text=True)])
            upstream = grad_output.reshape(()).to(accumulate)
            partial_scale = partial_scale if want_scale else torch.zeros_like(upstream)
            sums = None
            if self.gather_with_grad or want_scale:  # [sum_r g_r, sum_ij G0_ij x_ij]
                sums = all_reduce_(self.world, torch.stack([upstream, partial_scale]))
            factor = sums[0] if self.gather_with_grad else upstream
            grad_image = grad_image * factor
            grad_text = grad_text * factor if grad_text is not None else None
            return grad_image, grad_text, upstream * sums[1] if want_scale else None
        weights = pair_weights(grad_output, reduction, b, accumulate)  # c_i for this rank's pairs
        if self.gather_with_grad:
            grad_image, grad_text, _ = run([GradientPass(0.5 * weights, 0.5 * weights, image=True, text=True)])
        else:
            zero, half = (torch.full((), value, dtype=accumulate, device=image.device) for value in (0.0, 0.5))
            passes = [GradientPass(0.5 * weights, zero, image=True, text=False)]
            if want_text:  # the column cross-entropies of this rank's texts, against every rank's rows
                passes.append(GradientPass(torch.zeros_like(weights), half, image=False, text=True))
            grad_image, grad_text, _ = run(passes)
            grad_text = grad_text * weights[:, None] if grad_text is not None else None
        grad_scale = (weights * pair_scale_grad).sum() if want_scale else None
        return grad_image, grad_text, grad_scale
