"""Transformer blocks shared by the ViT image tower and the text tower.

Parameter names equal OpenAI's / open_clip's (``resblocks.N.ln_1``, ``.attn.in_proj_weight``,
``.mlp.c_fc`` ...). Two things differ from open_clip, both exact rewrites of the same math:

- ``Transformer.forward(x, pool_index=...)`` runs the last block on the pooled row only (CLS for
  the ViT, EOT for the text tower): its query projection, attention output, MLP and the final
  LayerNorm touch one row per sample instead of L. Keys and values still come from every row.
- QuickGELU saves only its input for backward (the sigmoid is recomputed), one activation tensor
  of the MLP's hidden width fewer per block than ``x * torch.sigmoid(1.702 * x)`` saves.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, supports_key_mask

__all__ = ["LayerNorm", "QuickGELU", "Mlp", "ResidualAttentionBlock", "Transformer", "checkpoint_call"]


class LayerNorm(nn.LayerNorm):
    """LayerNorm that normalises fp16/bf16 inputs in fp32 and casts back (OpenAI's LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            weight = self.weight.float() if self.weight is not None else None
            bias = self.bias.float() if self.bias is not None else None
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class _QuickGELUFunction(torch.autograd.Function):
    """y = x * sigmoid(1.702 x); saves x only, dy/dx = s + 1.702 x s (1 - s) with s recomputed."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        return grad_output * (s * (1 + 1.702 * x * (1 - s)))


class QuickGELU(nn.Module):
    """OpenAI's GELU approximation ``x * sigmoid(1.702 x)``, memory-lean in training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuickGELUFunction.apply(x)
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """c_fc -> GELU (or QuickGELU) -> c_proj; keys ``mlp.c_fc.*`` and ``mlp.c_proj.*``."""

    def __init__(self, width: int, hidden: int, quick_gelu: bool):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, quick_gelu: bool, attn_impl: str = "auto"):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads, attn_impl)
        self.ln_2 = LayerNorm(width)
        self.mlp = Mlp(width, mlp_width, quick_gelu)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))

    def forward_rows(self, x: torch.Tensor, index: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """The block's output at row ``index[b]`` of each sample: x (B, L, D), index (B,) -> (B, D)."""
        rows = x[torch.arange(x.shape[0], device=x.device), index]
        rows = rows + self.attn.forward_rows(self.ln_1(x), index, causal=causal)
        return rows + self.mlp(self.ln_2(rows))


def checkpoint_call(function: Callable, *args, context_fn: Optional[Callable] = None, **kwargs):
    """Non-reentrant activation checkpointing of one call (recomputed in backward)."""
    if context_fn is None:
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    return checkpoint(function, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


class Transformer(nn.Module):
    """A stack of ``ResidualAttentionBlock`` (key prefix ``resblocks.N``)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, quick_gelu: bool,
                 attn_impl: str = "auto"):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_width, quick_gelu, attn_impl) for _ in range(layers))

    def _call(self, function: Callable, *args, **kwargs):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_call(function, *args, **kwargs)
        return function(*args, **kwargs)

    def forward(self, x: torch.Tensor, causal: bool = False, pool_index: Optional[torch.Tensor] = None):
        """x: (B, L, D) -> (B, L, D); with ``pool_index`` (B,) -> (B, D), the rows at those indices.

        With ``pool_index`` the last block computes those rows only (see the module docstring).
        """
        blocks = list(self.resblocks)
        rows_only = pool_index is not None and blocks and (not causal or supports_key_mask(
            blocks[-1].attn.attn_impl))
        for block in blocks[:-1] if rows_only else blocks:
            x = self._call(block, x, causal=causal)
        if pool_index is None:
            return x
        if rows_only:
            return self._call(blocks[-1].forward_rows, x, pool_index, causal=causal)
        return x[torch.arange(x.shape[0], device=x.device), pool_index]

