"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss`` that never build the B x B logits.

    from fastclip.loss import ClipLoss                       # instead of open_clip.loss.ClipLoss
    loss = ClipLoss()(image_features, text_features, logit_scale)
    loss = clip_loss(image_features, text_features, logit_scale, normalize=True, reduction="mean")

Same signatures, values and gradients as open_clip 3.x (see docs/design.md, the loss contract); ``logit_scale`` is
the already-exponentiated temperature, as CLIP models return it. ``backend`` picks the implementation
("auto" | "torch" | "triton" | "cuda", see ``fastclip.backends``); with ``world_size > 1`` the
communication layer in ``fastclip.distributed`` computes each similarity entry once across ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fastclip.backends import LossInputs, select_backend
from fastclip.checks import as_scalar_tensor, check_features, check_reduction, guard_scalars
from fastclip.ops.clip_loss import REDUCTIONS, ClipLossFunction
from fastclip.ops.siglip_loss import SigLipLossFunction

__all__ = ["ClipLoss", "SigLipLoss", "clip_loss", "siglip_loss"]

CLIP_DIST_IMPLS = ("gather", "ring")
SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather", "ring")


def resolve_world(rank, world_size, process_group) -> tuple[int, int]:
    """(rank, world_size), defaulting to the process group's; ValueError when they cannot be right."""
    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size(process_group) if initialized else 1
    if rank is None:
        rank = dist.get_rank(process_group) if initialized else 0
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if world_size > 1 and not initialized:
        raise ValueError(f"world_size={world_size} but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group() first (torchrun sets its environment), "
                         "or leave world_size=None for a single process")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must be an int in [0, world_size={world_size})")
    if initialized and world_size > 1:
        group_size = dist.get_world_size(process_group)
        if group_size != world_size or dist.get_rank(process_group) != rank:
            raise ValueError(f"rank={rank}, world_size={world_size} disagree with the process group "
                             f"(rank {dist.get_rank(process_group)} of {group_size}): leave them as None")
    return rank, world_size


def _prepare(image_features, text_features, logit_scale, logit_bias, backend, deterministic):
    check_features(image_features, text_features)
    scale = as_scalar_tensor(logit_scale, "logit_scale", image_features, positive=True)
    if logit_bias is None:
        bias = torch.zeros((), device=image_features.device)
    else:
        bias = as_scalar_tensor(logit_bias, "logit_bias", image_features, positive=False)
    if isinstance(logit_scale, torch.Tensor) or isinstance(logit_bias, torch.Tensor):
        scale = guard_scalars(scale, bias)  # checked on the device: no host sync (floats were checked above)
    chosen = select_backend(backend, LossInputs(image_features.device, image_features.dtype, deterministic))
    return scale, bias, chosen


def _clip_loss(image_features, text_features, logit_scale, logit_bias, *, normalize, backend, deterministic,
               reduction, rank, world_size, process_group, dist_impl, local_loss, gather_with_grad):
    check_reduction(reduction, REDUCTIONS)
    if dist_impl not in CLIP_DIST_IMPLS:
        raise ValueError(f"dist_impl={dist_impl!r} is not a CLIP option: choose one of {', '.join(CLIP_DIST_IMPLS)}")
    scale, bias, chosen = _prepare(image_features, text_features, logit_scale, logit_bias, backend, deterministic)
    rank, world_size = resolve_world(rank, world_size, process_group)
    if world_size == 1:
        return ClipLossFunction.apply(image_features, text_features, scale, bias, chosen, normalize, reduction,
                                      deterministic)
    from fastclip.distributed import distributed_clip_loss

    return distributed_clip_loss(image_features, text_features, scale, bias, chosen, normalize=normalize,
                                 reduction=reduction, rank=rank, world_size=world_size, group=process_group,
                                 dist_impl=dist_impl, local_loss=local_loss, gather_with_grad=gather_with_grad,
                                 deterministic=deterministic)


def _siglip_loss(image_features, text_features, logit_scale, logit_bias, *, backend, rank, world_size,
                 process_group, dist_impl):
    dist_impl = "bidir" if dist_impl is None else dist_impl
    if dist_impl not in SIGLIP_DIST_IMPLS:
        raise ValueError(f"dist_impl={dist_impl!r} is not a SigLIP option: choose one of "
                         f"{', '.join(SIGLIP_DIST_IMPLS)}")
    scale, bias, chosen = _prepare(image_features, text_features, logit_scale, logit_bias, backend, False)
    rank, world_size = resolve_world(rank, world_size, process_group)
    if world_size == 1:
        return SigLipLossFunction.apply(image_features, text_features, scale, bias, chosen)
    from fastclip.distributed import distributed_siglip_loss

    return distributed_siglip_loss(image_features, text_features, scale, bias, chosen, rank=rank,
                                   world_size=world_size, group=process_group, dist_impl=dist_impl)


def clip_loss(image_features, text_features, logit_scale, *, logit_bias=None, normalize=False, backend="auto",
              process_group=None, dist_impl="gather", reduction="mean"):
    """Symmetric CLIP contrastive loss, memory-linear in the batch.

    image_features, text_features: (B, D) float32/float16/bfloat16, the local batch (pair i is positive).
    logit_scale: float or one-element tensor, already exponentiated (> 0). logit_bias: optional scalar.
    normalize: L2-normalise both inputs inside the op (gradient included).
    reduction: "mean" (open_clip's value), "sum", or "none" (the (B,) per-pair losses; across ranks,
    this rank's (b,) pairs with global statistics).
    Under torch.distributed with more than one rank this is the global-batch loss (``local_loss=False``,
    ``gather_with_grad=True``), whose DDP-averaged gradient equals the single-process one.
    """
    return _clip_loss(image_features, text_features, logit_scale, logit_bias, normalize=normalize, backend=backend,
                      deterministic=False, reduction=reduction, rank=None, world_size=None,
                      process_group=process_group, dist_impl=dist_impl, local_loss=False, gather_with_grad=True)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, backend="auto", process_group=None,
                dist_impl="bidir"):
    """open_clip's SigLIP loss: -sum log sigmoid(y (scale I.T + bias)) / B_local, memory-linear.

    image_features, text_features: (B, D); logit_scale > 0 (exponentiated); logit_bias: scalar or None.
    """
    return _siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=backend, rank=None,
                        world_size=None, process_group=process_group, dist_impl=dist_impl)


class ClipLoss(torch.nn.Module):
    """open_clip's ``ClipLoss`` with the same arguments, values and gradients, fused and memory-linear.

    ``cache_labels`` is accepted for compatibility (no labels are built). ``use_horovod=True`` is not
    supported: use torch.distributed. Keyword-only extras: ``backend``, ``dist_impl`` ("gather" or
    "ring"), ``process_group``, ``normalize`` and ``deterministic`` (bitwise-repeatable gradients).
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=None, world_size=None,
                 use_horovod=False, *, backend="auto", dist_impl="gather", process_group=None, normalize=False,
                 deterministic=False):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: fastclip uses torch.distributed. Launch with "
                             "torchrun and call torch.distributed.init_process_group() instead")
        if dist_impl not in CLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl={dist_impl!r} is not a CLIP option: choose one of "
                             f"{', '.join(CLIP_DIST_IMPLS)}")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.backend, self.dist_impl, self.process_group = backend, dist_impl, process_group
        self.normalize, self.deterministic = normalize, deterministic

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = _clip_loss(image_features, text_features, logit_scale, logit_bias, normalize=self.normalize,
                          backend=self.backend, deterministic=self.deterministic, reduction="mean",
                          rank=self.rank, world_size=self.world_size, process_group=self.process_group,
                          dist_impl=self.dist_impl, local_loss=self.local_loss,
                          gather_with_grad=self.gather_with_grad)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(torch.nn.Module):
    """open_clip's ``SigLipLoss`` (sigmoid loss with ``logit_bias``), fused and memory-linear.

    ``dist_impl`` None means "bidir"; open_clip's "bidir", "shift", "reduce" and "gather" are accepted,
    plus "ring". All give open_clip's values and gradients.
    """

    def __init__(self, cache_labels=False, rank=None, world_size=None, dist_impl=None, *, backend="auto",
                 process_group=None):
        super().__init__()
        dist_impl_name = "bidir" if dist_impl is None else dist_impl
        if dist_impl_name not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl={dist_impl!r} is not a SigLIP option: choose one of "
                             f"{', '.join(SIGLIP_DIST_IMPLS)}")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl, self.backend, self.process_group = dist_impl_name, backend, process_group

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        loss = _siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend,
                            rank=self.rank, world_size=self.world_size, process_group=self.process_group,
                            dist_impl=self.dist_impl)
        return {"contrastive_loss": loss} if output_dict else loss
