"""LiT-style tower locking (arXiv:2111.07991) with open_clip's meanings.

A locked tower's parameters get ``requires_grad = False``: autograd computes no gradient for them,
and the trainer's optimiser (built after locking from the parameters that require grad) holds no
state for them. The last ``N`` *groups* can stay trainable; the groups are open_clip's:

- ViT image tower: ``[conv1, class_embedding, positional_embedding, ln_pre]``, then each block but the
  last, then ``[last block, ln_post]``, then ``proj``. ``unlocked_groups=1`` trains the projection only.
- ModifiedResNet image tower: locked whole (open_clip has no partial locking for it either).
- Text tower: ``[token_embedding, positional_embedding]``, then each block but the last, then
  ``[last block, ln_final]``, then ``text_projection``.

``freeze_bn_stats`` (image tower) makes the locked tower's BatchNorm layers use and keep their running
statistics in training too, as open_clip's ``FrozenBatchNorm2d`` does (the weights keep their names).
``freeze_layer_norm`` (text tower) decides whether the LayerNorm gains and biases inside locked groups
are frozen with them (True) or stay trainable (False), the meaning open_clip gives the flag for its
Hugging Face text towers.
"""
from __future__ import annotations

from typing import Iterable, Union

from torch import nn

__all__ = ["FrozenBatchNorm2d", "lock_image_tower", "lock_text_tower", "freeze_batch_norm_stats"]

Group = list[Union[nn.Module, nn.Parameter]]


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that normalises with its running statistics and never updates them, in train mode too.

    Same state-dict keys as ``nn.BatchNorm2d``; ``train(True)`` leaves it in eval mode.
    """

    def train(self, mode: bool = True):
        return super().train(False)


def _parameters(group: Iterable[Union[nn.Module, nn.Parameter]]) -> list[nn.Parameter]:
    found = []
    for item in group:
        found.extend([item] if isinstance(item, nn.Parameter) else item.parameters())
    return found


def _set_trainable(groups: list[Group], trainable: bool) -> None:
    for group in groups:
        for parameter in _parameters(group):
            parameter.requires_grad_(trainable)


def _check_count(name: str, count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{name} must be a whole number >= 0 (0: lock the whole tower), got {count!r}")


def freeze_batch_norm_stats(module: nn.Module) -> int:
    """Replace every ``nn.BatchNorm2d`` under ``module`` by a :class:`FrozenBatchNorm2d` with the same
    state, its weight and bias frozen. Returns how many were replaced."""
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, FrozenBatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum,
                                       affine=child.affine, track_running_stats=child.track_running_stats,
                                       device=child.running_mean.device if child.running_mean is not None else None,
                                       dtype=child.weight.dtype if child.affine else None)
            frozen.load_state_dict(child.state_dict())
            for parameter in frozen.parameters():
                parameter.requires_grad_(False)
            setattr(module, name, frozen)
            replaced += 1
        else:
            replaced += freeze_batch_norm_stats(child)
    return replaced


def _vision_groups(visual: nn.Module) -> list[Group]:
    blocks = list(visual.transformer.resblocks)
    return [[visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre],
            *[[block] for block in blocks[:-1]], [blocks[-1], visual.ln_post], [visual.proj]]


def lock_image_tower(model: nn.Module, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
    """Freeze ``model.visual`` but its last ``unlocked_groups`` groups (module docstring); in place."""
    _check_count("unlocked_groups (--lock-image-unlocked-groups)", unlocked_groups)
    visual = model.visual
    if not hasattr(visual, "transformer"):  # ModifiedResNet
        if unlocked_groups:
            raise ValueError("--lock-image-unlocked-groups needs a ViT image tower; a ModifiedResNet tower is "
                             "locked whole (as in open_clip): drop the flag or pick a ViT --model")
        _set_trainable([[visual]], False)
    else:
        groups = _vision_groups(visual)
        _set_trainable(groups, False)
        if unlocked_groups:
            _set_trainable(groups[-unlocked_groups:], True)
    if freeze_bn_stats:
        freeze_batch_norm_stats(visual)


def _text_groups(model: nn.Module) -> list[Group]:
    blocks = list(model.transformer.resblocks)
    return [[model.token_embedding, model.positional_embedding], *[[block] for block in blocks[:-1]],
            [blocks[-1], model.ln_final], [model.text_projection]]


def lock_text_tower(model: nn.Module, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
    """Freeze the text tower but its last ``unlocked_layers`` groups (module docstring); in place.

    ``model`` is a ``CLIP`` or a ``TextTransformer`` (both hold the text parts at their top level).
    """
    _check_count("unlocked_layers (--lock-text-unlocked-layers)", unlocked_layers)
    groups = _text_groups(model)
    locked = groups[:-unlocked_layers] if unlocked_layers else groups
    _set_trainable(groups, False)
    if unlocked_layers:
        _set_trainable(groups[-unlocked_layers:], True)
    if not freeze_layer_norm:
        norms = [module for group in locked for item in group if isinstance(item, nn.Module)
                 for module in item.modules() if isinstance(module, nn.LayerNorm)]
        _set_trainable([norms], True)
