"""The LiT flags of ``fastclip train`` (open_clip's names): lock the towers of a freshly built model.

Applied before the optimiser is built, so it holds no state for the frozen parameters; the meanings
of the groups and of the BatchNorm / LayerNorm options are in :mod:`fastclip.model.lock`.
"""
from __future__ import annotations

import torch


def check_lock_options(config) -> None:
    """The refining flags need the lock they refine (open_clip ignores them silently; fastclip says so)."""
    if not config.lock_image and (config.lock_image_unlocked_groups or config.lock_image_freeze_bn_stats):
        raise ValueError("--lock-image-unlocked-groups / --lock-image-freeze-bn-stats refine --lock-image; add it")
    if not config.lock_text and (config.lock_text_unlocked_layers or config.lock_text_freeze_layer_norm):
        raise ValueError("--lock-text-unlocked-layers / --lock-text-freeze-layer-norm refine --lock-text; add it")


def apply_locks(model: torch.nn.Module, config) -> list[str]:
    """Lock ``model``'s towers as ``config``'s ``lock_*`` fields say. Returns lines describing what was locked."""
    check_lock_options(config)
    notes = []
    if config.lock_image:
        model.lock_image_tower(unlocked_groups=config.lock_image_unlocked_groups,
                               freeze_bn_stats=config.lock_image_freeze_bn_stats)
        notes.append(f"image tower locked (last {config.lock_image_unlocked_groups} group(s) trainable"
                     f"{', BatchNorm statistics frozen' if config.lock_image_freeze_bn_stats else ''})")
    if config.lock_text:
        model.lock_text_tower(unlocked_layers=config.lock_text_unlocked_layers,
                              freeze_layer_norm=config.lock_text_freeze_layer_norm)
        notes.append(f"text tower locked (last {config.lock_text_unlocked_layers} group(s) trainable, LayerNorms "
                     f"{'frozen' if config.lock_text_freeze_layer_norm else 'trainable'})")
    return notes
