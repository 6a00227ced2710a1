"""L2 normalisation fused into the loss ops: forward keeps 1/|x| (O(B)), backward maps the gradient.

Matches ``torch.nn.functional.normalize(x, dim=-1, eps=1e-12)``: y = x / max(|x|, eps), and for
|x| > eps the gradient dx = (dy - y (y . dy)) / |x|.
"""
from __future__ import annotations

import torch

from fastclip.devices import accumulate_dtype

EPS = 1e-12


def normalize_rows(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features / max(|features|, eps) in the input dtype, the fp32 norms clamped at eps)."""
    accumulate = accumulate_dtype(features)
    norms = torch.linalg.vector_norm(features.to(accumulate), dim=-1).clamp_min(EPS)
    return (features.to(accumulate) / norms[:, None]).to(features.dtype), norms


def normalize_rows_backward(grad_normalized: torch.Tensor, normalized: torch.Tensor,
                            norms: torch.Tensor) -> torch.Tensor:
    """d/dx of y = x / |x|, given y (the saved normalised rows) and |x|; fp32 in, fp32 out."""
    y = normalized.to(grad_normalized.dtype)
    radial = (y * grad_normalized).sum(dim=-1, keepdim=True)
    grad = (grad_normalized - y * radial) / norms[:, None]
    # Rows clamped at eps were divided by eps, not |x|: their gradient is dy / eps (no radial term).
    return torch.where((norms <= EPS)[:, None], grad_normalized / EPS, grad)
