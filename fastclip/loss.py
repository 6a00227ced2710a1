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
from fastclip.checks import as_scalar_tensor, check_features, guard_scalars
from fastclip.distributed import distributed_clip_loss, distributed_siglip_loss
from fastclip.ops.clip_loss import ClipLossFunction
from fastclip.ops.options import ClipOptions, SigLipOptions
from fastclip.ops.siglip_loss import SigLipLossFunction

__all__ = ["ClipLoss", "SigLipLoss", "clip_loss", "siglip_loss", "ClipOptions", "SigLipOptions"]


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


def _prepare(image_features, text_features, logit_scale, logit_bias, options):
    """The call's checks and per-call choices: (scale, bias, backend, (rank, world_size))."""
    check_features(image_features, text_features)
    scale = as_scalar_tensor(logit_scale, "logit_scale", image_features, positive=True)
    if logit_bias is None:
        bias = torch.zeros((), device=image_features.device)
    else:
        bias = as_scalar_tensor(logit_bias, "logit_bias", image_features, positive=False)
    if isinstance(logit_scale, torch.Tensor) or isinstance(logit_bias, torch.Tensor):
        scale = guard_scalars(scale, bias)  # checked on the device: no host sync (floats were checked above)
    inputs = LossInputs(image_features.device, image_features.dtype, options.deterministic)
    backend = select_backend(options.backend, inputs)
    return scale, bias, backend, resolve_world(options.rank, options.world_size, options.process_group)


def _loss(function, distributed_loss, image_features, text_features, logit_scale, logit_bias, options):
    """The route of both losses: check and resolve per call, then one process (``function``, the
    autograd Function) or many (``distributed_loss``, which adds the exchange between ranks)."""
    scale, bias, backend, (rank, world_size) = _prepare(image_features, text_features, logit_scale, logit_bias,
                                                        options)
    if world_size == 1:
        return function.apply(image_features, text_features, scale, bias, backend, options)
    return distributed_loss(image_features, text_features, scale, bias, backend, options, rank, world_size)


def _clip_loss(image_features, text_features, logit_scale, logit_bias, options: ClipOptions):
    return _loss(ClipLossFunction, distributed_clip_loss, image_features, text_features, logit_scale, logit_bias,
                 options)


def _siglip_loss(image_features, text_features, logit_scale, logit_bias, options: SigLipOptions):
    return _loss(SigLipLossFunction, distributed_siglip_loss, image_features, text_features, logit_scale,
                 logit_bias, options)


def clip_loss(image_features, text_features, logit_scale, *, logit_bias=None, normalize=False, backend="auto",
              process_group=None, dist_impl="gather", reduction="mean"):
    """Symmetric CLIP contrastive loss, memory-linear in the batch.

    image_features, text_features: (B, D) float32/float16/bfloat16, the local batch (pair i is positive).
    logit_scale: float or one-element tensor, already exponentiated (> 0). logit_bias: optional scalar.
    normalize: L2-normalise both inputs inside the op (gradient included).
    reduction: "mean" (open_clip's value), "sum", or "none" (the (B,) per-pair losses; across ranks,
    this rank's (b,) pairs with global statistics).
    Returns fp32 (fp64 for fp64 features) whatever the features' dtype: the statistics are accumulated
    in fp32, and open_clip's bf16/fp16 loss is that value rounded to 8 or 11 bits (cast it if you want it).
    Under torch.distributed with more than one rank this is the global-batch loss (``local_loss=False``,
    ``gather_with_grad=True``), whose DDP-averaged gradient equals the single-process one.
    """
    options = ClipOptions(gather_with_grad=True, process_group=process_group, dist_impl=dist_impl, backend=backend,
                          normalize=normalize, reduction=reduction)
    return _clip_loss(image_features, text_features, logit_scale, logit_bias, options)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, normalize=False, backend="auto",
                process_group=None, dist_impl="bidir"):
    """open_clip's SigLIP loss: -sum log sigmoid(y (scale I.T + bias)) / B_local, memory-linear.

    image_features, text_features: (B, D); logit_scale > 0 (exponentiated); logit_bias: scalar or None.
    normalize: L2-normalise both inputs inside the op (gradient included). Returns fp32 (see clip_loss).
    """
    options = SigLipOptions(process_group=process_group, dist_impl=dist_impl, backend=backend, normalize=normalize)
    return _siglip_loss(image_features, text_features, logit_scale, logit_bias, options)


class ClipLoss(torch.nn.Module):
    """open_clip's ``ClipLoss`` with the same arguments, values and gradients, fused and memory-linear.

    ``cache_labels`` is accepted for compatibility (no labels are built). ``use_horovod=True`` is not
    supported: use torch.distributed. Keyword-only extras (``fastclip.ops.options.ClipOptions`` says
    what each does): ``backend``, ``dist_impl`` ("gather" or "ring"), ``process_group``, ``normalize``,
    ``deterministic`` (bitwise-repeatable gradients) and ``reduction`` ("mean", "sum", "none", as
    ``clip_loss``'s). The loss is fp32 for fp32/fp16/bf16 features (open_clip returns the features'
    dtype): see ``clip_loss``.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=None, world_size=None,
                 use_horovod=False, *, backend="auto", dist_impl="gather", process_group=None, normalize=False,
                 deterministic=False, reduction="mean"):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: fastclip uses torch.distributed. Launch with "
                             "torchrun and call torch.distributed.init_process_group() instead")
        self.cache_labels, self.use_horovod = cache_labels, use_horovod
        self.options = ClipOptions(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                   world_size=world_size, process_group=process_group, dist_impl=dist_impl,
                                   backend=backend, normalize=normalize, deterministic=deterministic,
                                   reduction=reduction)

    local_loss = property(lambda self: self.options.local_loss)
    gather_with_grad = property(lambda self: self.options.gather_with_grad)
    rank = property(lambda self: self.options.rank)
    world_size = property(lambda self: self.options.world_size)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = _clip_loss(image_features, text_features, logit_scale, logit_bias, self.options)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(torch.nn.Module):
    """open_clip's ``SigLipLoss`` (sigmoid loss with ``logit_bias``), fused and memory-linear.

    ``dist_impl`` None means "bidir"; open_clip's "bidir", "shift", "reduce" and "gather" are accepted,
    plus "ring". All give open_clip's values and gradients. ``chunk_size`` (open_clip main's row
    chunking, 0 = none) is accepted and ignored: fastclip never builds the B x B matrix, and its
    workspace is already bounded by FASTCLIP_WORKSPACE_MB (fastclip.ops.workspace), whatever
    chunk_size says. Keyword-only extras: ``backend``, ``process_group``, ``normalize``.
    """

    def __init__(self, cache_labels=False, rank=None, world_size=None, dist_impl=None, chunk_size=0, *,
                 backend="auto", process_group=None, normalize=False):
        super().__init__()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 0 (open_clip's row chunking; fastclip "
                             "bounds its workspace with FASTCLIP_WORKSPACE_MB instead and ignores the value)")
        self.cache_labels, self.chunk_size = cache_labels, chunk_size
        self.options = SigLipOptions(rank=rank, world_size=world_size, process_group=process_group,
                                     dist_impl="bidir" if dist_impl is None else dist_impl, backend=backend,
                                     normalize=normalize)

    rank = property(lambda self: self.options.rank)
    world_size = property(lambda self: self.options.world_size)
    dist_impl = property(lambda self: self.options.dist_impl)

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        loss = _siglip_loss(image_features, text_features, logit_scale, logit_bias, self.options)
        return {"contrastive_loss": loss} if output_dict else loss
