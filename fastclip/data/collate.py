"""Batching of ``(image, tokens, skipped)`` samples."""
from __future__ import annotations

import torch


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the trailing columns that are padding (id 0) in every row: (N, L) -> (N, L'), L' <= L.

    The text tower pools at the EOT token under causal attention, so its features do not change; a
    batch of 10-word captions then costs 12-16 positions instead of 77.
    """
    used = (tokens != 0).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1] if used.numel() else tokens


def collate_pairs(samples):
    """-> images (B, 3, H, W), tokens (B, L') trimmed of shared padding, total skipped-image count."""
    images, tokens, skipped = zip(*samples)
    return torch.stack(images), trim_padding(torch.stack(tokens)), int(sum(skipped))
