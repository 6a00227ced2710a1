"""ViT image tower (OpenAI's ``VisionTransformer``) with FLIP patch dropout."""
from __future__ import annotations

import torch
from torch import nn

from .config import VisionConfig
from .transformer import LayerNorm, Transformer

__all__ = ["PatchDropout", "VisionTransformer"]


class PatchDropout(nn.Module):
    """FLIP (arXiv:2212.00794): in training keep a random ``1 - prob`` of the patch tokens.

    The CLS token (row 0) is always kept and stays first; the kept patches are a uniformly random
    subset per sample. Identity in eval mode or with ``prob == 0``.
    """

    def __init__(self, prob: float = 0.0):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {prob}")
        self.prob = float(prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1 + N, D) -> (B, 1 + max(1, int(N * (1 - prob))), D)."""
        if not self.training or self.prob == 0.0:
            return x
        batch, length, width = x.shape
        patches = length - 1
        keep = max(1, int(patches * (1.0 - self.prob)))
        kept = torch.rand(batch, patches, device=x.device).topk(keep, dim=-1).indices
        kept_patches = torch.gather(x[:, 1:], 1, kept.unsqueeze(-1).expand(-1, -1, width))
        return torch.cat([x[:, :1], kept_patches], dim=1)

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


class VisionTransformer(nn.Module):
    """Patchify (conv1) -> [CLS] + patches + positions -> ln_pre -> blocks -> ln_post(CLS) @ proj.

    Keys: ``conv1.weight, class_embedding, positional_embedding, ln_pre, transformer.resblocks.N,
    ln_post, proj`` (OpenAI's).
    """

    def __init__(self, config: VisionConfig, output_dim: int, quick_gelu: bool, attn_impl: str = "auto",
                 patch_dropout: float = 0.0):
        super().__init__()
        width = config.width
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.grid_size = config.grid_size
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, width))
        self.patch_dropout = PatchDropout(patch_dropout)
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, config.layers, config.heads, config.mlp_width, quick_gelu, attn_impl)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, 3, S, S) with S = image_size -> (B, output_dim), not normalised."""
        if image.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images of {self.image_size}x{self.image_size}, got "
                             f"{tuple(image.shape[-2:])}; create the model with image_size=... to change it")
        x = self.conv1(image).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(self.patch_dropout(x))
        cls_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        pooled = self.transformer(x, pool_index=cls_index)  # (B, D): the CLS row
        return self.ln_post(pooled) @ self.proj
