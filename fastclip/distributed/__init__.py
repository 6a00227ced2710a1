"""Distributed CLIP / SigLIP losses over torch.distributed, with open_clip's values and gradients.

``ClipLoss(local_loss, gather_with_grad, ...)``, ``SigLipLoss`` and the functional forms route here
when the world size is above 1. Rank r holds b pairs; the global batch is B = W b.

What is computed: rank r computes only its b rows of S = scale * I @ T_all.T + bias against all B
columns, so each similarity entry is computed once across ranks (open_clip's default recomputes
the whole B x B on every rank; its ``local_loss`` computes b x B twice). Two exchanges:

    dist_impl="gather"  all-gather one tower (the texts) forward, in its dtype; column log-sum-exps
                        from two O(B)-float all-reduces; reduce-scatter of the text gradient
                        backward (features' dtype). Half of open_clip's traffic (it gathers both
                        towers and sends both gradients back). Saves the gathered texts (B x D).
    dist_impl="ring"    text blocks passed to the right neighbour with async P2P under the block
                        compute; column statistics and text gradients travel back to their owner.
                        Saves only the local inputs and O(b) vectors: memory does not grow with W.

Before any of this, one all-gather of a few int64 per rank checks that every rank passes the same
(b, D, dtype) and options; otherwise every rank raises the same ValueError (uneven local batches
are rejected, as open_clip's gather assumes them equal too) instead of hanging.

Gradient conventions (exactly open_clip's; g_r = 1 under a plain ``loss.backward()``):

    gather_with_grad=True, either local_loss: each rank's feature gradient is W dL/dX_r, and DDP's
        averaging over ranks then gives parameter gradients equal to the single-process gradient of
        the global-batch loss L. logit_scale's gradient is dL/ds (local_loss=False) or dL_r/ds
        (local_loss=True, L_r its rank's local loss), which DDP averages to dL/ds as well.
    gather_with_grad=False, local_loss=False (open_clip's default): feature gradients are dL/dX_r,
        1/W of the above, while logit_scale's is the full dL/ds: after DDP averaging the towers
        learn W times slower relative to the temperature than in single-process training.
    gather_with_grad=False, local_loss=True: each rank's images only get the gradient of their own
        row cross-entropies and its texts of their own column cross-entropies (dL_r through the
        local slots); neither equals a slice of the global-batch gradient.

The SigLIP loss follows open_clip's ``SigLipLoss`` (see ``fastclip.distributed.siglip``): texts
receive every rank's gradient, images / scale / bias their own rank's. DDP averaging gives the
single-process gradient of the global-batch SigLIP loss.

``count_communication()`` counts the bytes any torch.distributed call moves (tests, benchmarks).
"""
from __future__ import annotations

import torch

from fastclip.distributed.clip import DistributedClip
from fastclip.distributed.comm import World, check_consistent, count_communication
from fastclip.distributed.exchange import EXCHANGES
from fastclip.distributed.siglip import SIGLIP_EXCHANGE_OF
from fastclip.ops.clip_loss import ClipLossFunction
from fastclip.ops.options import REDUCTIONS, ClipOptions, SigLipOptions
from fastclip.ops.siglip_loss import SigLipLossFunction

__all__ = ["distributed_clip_loss", "distributed_siglip_loss", "count_communication"]

_LOSS_CODES = {"clip": 1, "siglip": 2}
_EXCHANGE_CODES = {name: code for code, name in enumerate(SIGLIP_EXCHANGE_OF, start=1)}


def _grad_flags(image_features, text_features, scale) -> dict[str, int]:
    """Which inputs need a gradient: backward's collectives depend on it, so every rank must agree."""
    enabled = torch.is_grad_enabled()
    return {"image_features.requires_grad": int(enabled and image_features.requires_grad),
            "text_features.requires_grad": int(enabled and text_features.requires_grad),
            "logit_scale.requires_grad": int(enabled and scale.requires_grad)}


def distributed_clip_loss(image_features, text_features, scale, bias, backend, options: ClipOptions, rank: int,
                          world_size: int):
    """open_clip's ``ClipLoss(local_loss, gather_with_grad, rank, world_size)`` on rank ``rank`` of the group.

    image_features, text_features: (b, D), this rank's pairs; scale / bias: one-element tensors;
    backend: the ``LossBackend`` picked for this call; options: its ``ClipOptions`` (validated).
    Returns L (local_loss=False) or L_r (local_loss=True); reduction="none" gives this rank's (b,)
    per-pair losses with global statistics, "sum" the global (or local) sum.
    """
    world = World(options.process_group, rank, world_size)
    check_consistent(world, image_features, {
        "loss": _LOSS_CODES["clip"], "dist_impl": _EXCHANGE_CODES[options.dist_impl],
        "local_loss": int(options.local_loss), "gather_with_grad": int(options.gather_with_grad),
        "normalize": int(options.normalize), "reduction": REDUCTIONS.index(options.reduction),
        **_grad_flags(image_features, text_features, scale)})
    exchange = EXCHANGES[options.dist_impl](world, backend, options.deterministic)
    plan = DistributedClip(world, exchange, options)
    return ClipLossFunction.apply(image_features, text_features, scale, bias, backend, options, plan)


def distributed_siglip_loss(image_features, text_features, scale, bias, backend, options: SigLipOptions, rank: int,
                            world_size: int):
    """open_clip's ``SigLipLoss(rank, world_size, dist_impl)``: this rank's images against all texts, / b."""
    world = World(options.process_group, rank, world_size)
    exchange_name = SIGLIP_EXCHANGE_OF[options.dist_impl]
    check_consistent(world, image_features, {
        "loss": _LOSS_CODES["siglip"], "dist_impl": _EXCHANGE_CODES[exchange_name],
        "normalize": int(options.normalize), **_grad_flags(image_features, text_features, scale)})
    exchange = EXCHANGES[exchange_name](world, backend, options.deterministic)
    return SigLipLossFunction.apply(image_features, text_features, scale, bias, backend, options, exchange)
