"""``--fsdp``: shard parameters, gradients and optimizer state with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each residual block of both towers is one FSDP unit (the transformer blocks of a ViT and of the text tower,
the Bottlenecks of a ModifiedResNet), then the root holds what is left (embeddings, projections, final
norms). In forward a unit all-gathers its parameters just before it runs and frees them after (unless
``--fsdp-no-reshard-after-forward``); in backward it gathers them again and reduce-scatters its gradient, so
each rank keeps 1/W of the parameters, gradients and AdamW state. Plain PyTorch equivalent::

    for block in blocks_of_both_towers: fully_shard(block, mp_policy=..., reshard_after_forward=...)
    fully_shard(model, ...)

What fastclip adds around it:

- ``--precision`` chooses the MixedPrecisionPolicy (:func:`mixed_precision_policy`): amp_bf16 computes in
  bf16 from fp32 parameters and reduces gradients in fp32; pure_bf16 (pure_fp16) keeps everything in that
  dtype; fp32 is fp32. ``amp`` (fp16 with a GradScaler) is refused: its scaler does not know sharded
  gradients; so are bf16/fp16 (open_clip's: matmul weights low, the rest fp32), whose units mix dtypes.
- FSDP2 cannot shard 0-d parameters (``logit_scale``, ``logit_bias``): they stay whole on every rank, outside
  FSDP, and their gradient is averaged over ranks when it is complete (a post-accumulate-grad hook), as DDP
  averages it. So their state-dict entries keep the shapes of open_clip's.
- ``--grad-checkpointing`` recomputes each block inside its FSDP unit (FSDP2 gathers the parameters again
  for the recomputation); ``--accum-freq`` syncs gradients only on the last micro-batch
  (:func:`gradient_sync`); the LiT locks freeze parameters before sharding; the last block's
  ``forward_rows`` and the towers' ``encode_image``/``encode_text`` are registered FSDP forward methods.
- On one process there is nothing to shard: the run trains unsharded and says so (and still writes the
  ``--fsdp-checkpoint`` layout).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from fastclip.distributed.comm import World

#: what each --precision becomes under --fsdp: (parameter dtype in compute, gradient reduction dtype);
#: None: no policy (FSDP computes and reduces in the parameters' own dtype)
_POLICY_DTYPES = {"amp_bf16": (torch.bfloat16, torch.float32), "amp_bfloat16": (torch.bfloat16, torch.float32)}
#: bf16/fp16 (matmul weights only, the rest fp32) are left out: FSDP2 gathers a unit's parameters in one dtype
FSDP_PRECISIONS = ("fp32", "amp_bf16", "amp_bfloat16", "pure_bf16", "pure_fp16")


def check_fsdp_options(config) -> None:
    """ValueError for FSDP flags that cannot apply (``TrainConfig`` calls this on construction)."""
    if not config.fsdp:
        given = [flag for flag, value in (("--fsdp-checkpoint", config.fsdp_checkpoint),
                                          ("--fsdp-no-reshard-after-forward", config.fsdp_no_reshard_after_forward),
                                          ("--fsdp-offload-cpu", config.fsdp_offload_cpu)) if value]
        if given:
            raise ValueError(f"{', '.join(given)} only applies to sharded training: add --fsdp, or drop "
                             f"{'them' if len(given) > 1 else 'it'}")
        return
    if config.fsdp_checkpoint not in (None, "full", "sharded"):
        raise ValueError(f"--fsdp-checkpoint {config.fsdp_checkpoint!r} is not one of full, sharded")
    if config.precision is not None and config.precision not in FSDP_PRECISIONS:  # None: chosen in run(), checked then
        why = ("its GradScaler does not handle sharded gradients" if config.precision == "amp" else
               "its weights are of two dtypes, and FSDP2 gathers a unit in one")
        raise ValueError(f"--precision {config.precision} is not supported with --fsdp ({why}); use one of "
                         f"{', '.join(FSDP_PRECISIONS)}, e.g. amp_bf16")


def checkpoint_layout(config) -> str:
    """``full`` or ``sharded``: the checkpoint layout this run writes."""
    return (config.fsdp_checkpoint or "full") if config.fsdp else "full"


def mixed_precision_policy(precision: str):
    """The FSDP2 MixedPrecisionPolicy of ``precision`` (see the module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision in _POLICY_DTYPES:
        compute, reduce = _POLICY_DTYPES[precision]
        return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=reduce)
    return MixedPrecisionPolicy()  # parameters are already in the run's dtype (fp32, or bf16/fp16 throughout)


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of both towers, in forward order: the FSDP units."""
    from fastclip.model.resnet import ModifiedResNet

    visual = model.visual
    if isinstance(visual, ModifiedResNet):
        image_blocks = [block for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4)
                        for block in stage]
    else:
        image_blocks = list(visual.transformer.resblocks)
    return image_blocks + list(model.transformer.resblocks)


def _average_gradient_over_ranks(parameter: torch.Tensor) -> None:
    """A whole (unsharded) parameter's gradient -> its mean over ranks, as DDP would have reduced it."""
    dist.all_reduce(parameter.grad)
    parameter.grad.div_(dist.get_world_size())


def shard_model(model: nn.Module, config) -> nn.Module:
    """``fully_shard`` the blocks of both towers, then the root (in place; returns ``model``).

    Call after the LiT locks and before building the optimizer (it replaces the parameters by sharded ones).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    options = {"mp_policy": mixed_precision_policy(config.precision),
               "reshard_after_forward": not config.fsdp_no_reshard_after_forward,
               "offload_policy": CPUOffloadPolicy() if config.fsdp_offload_cpu else OffloadPolicy()}
    for block in residual_blocks(model):
        fully_shard(block, **options)
        if hasattr(block, "forward_rows"):  # the pooled last block (fastclip.model.transformer)
            register_fsdp_forward_method(block, "forward_rows")
    whole = {parameter for parameter in model.parameters() if parameter.ndim == 0}
    fully_shard(model, ignored_params=whole, **options)
    for method in ("encode_image", "encode_text"):
        register_fsdp_forward_method(model, method)
    for parameter in whole:
        if parameter.requires_grad:
            parameter.register_post_accumulate_grad_hook(_average_gradient_over_ranks)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """FSDP2's ``no_sync``: with ``enabled=False`` backward accumulates unsharded gradients locally and the
    next synced backward reduce-scatters their sum (what DDP's ``no_sync`` does with all-reduce)."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_model_state(model: nn.Module) -> dict:
    """The whole state dict on the main rank, on CPU ({} on the others). Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def evaluation_model(parts, ctx: World, config) -> nn.Module | None:
    """The model to evaluate on the main rank: the trained model itself, or under FSDP an unsharded copy of
    its weights there (None on the other ranks). Collective under FSDP: every rank calls it."""
    model = parts.unwrapped
    if not is_sharded(model):
        return model
    weights = full_model_state(model)
    if not ctx.is_main:
        return None
    import fastclip
    from fastclip.train.lit import apply_locks

    copy = fastclip.create_model(config.model, attn_impl=config.attn_impl, device=ctx.device,
                                 precision=config.precision, image_size=config.force_image_size)
    apply_locks(copy, config)  # the same modules (frozen BatchNorm) as the trained model, so the same keys
    copy.load_state_dict(weights)
    return copy
