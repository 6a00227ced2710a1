"""Causal text tower pooled at the EOT token (OpenAI's ``encode_text``).

tokens (B, L) -> token_embedding + positional_embedding[:L] -> causal blocks -> ln_final at the
EOT row (``tokens.argmax(-1)``: EOT 49407 is the largest id) -> @ text_projection.

Any L <= context_length works: with causal attention and EOT pooling, padding after the EOT
token never reaches the pooled row, so tokens cut to their longest EOT give the same features.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import TextConfig
from .transformer import LayerNorm, Transformer

__all__ = ["TextTransformer", "TEXT_TOWER_KEYS", "encode_text_tokens"]

# Attribute names of the text tower; CLIP holds them at the top level (OpenAI's state-dict layout).
TEXT_TOWER_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


class TextTransformer(nn.Module):
    """Standalone text tower (``CLIP`` holds the same five parts directly, without a ``text.`` prefix)."""

    def __init__(self, config: TextConfig, output_dim: int, quick_gelu: bool, attn_impl: str = "auto"):
        super().__init__()
        self.context_length = config.context_length
        self.vocab_size = config.vocab_size
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = Transformer(config.width, config.layers, config.heads, config.mlp_width, quick_gelu,
                                       attn_impl)
        self.ln_final = LayerNorm(config.width)
        self.text_projection = nn.Parameter(torch.empty(config.width, output_dim))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return encode_text_tokens(self, tokens)


def encode_text_tokens(tower: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """tokens: (B, L) int ids, L <= context_length -> (B, output_dim), not normalised.

    ``tower`` is any module holding the five ``TEXT_TOWER_KEYS`` parts (a TextTransformer or CLIP).
    """
    if tokens.ndim != 2:
        raise ValueError(f"expected token ids of shape (batch, length), got {tuple(tokens.shape)}")
    length = tokens.shape[1]
    context_length = tower.positional_embedding.shape[0]
    if length > context_length:
        raise ValueError(f"token sequences of length {length} exceed the model's context_length {context_length}")
    dtype = tower.text_projection.dtype
    x = tower.token_embedding(tokens).to(dtype) + tower.positional_embedding[:length].to(dtype)
    eot_index = tokens.argmax(dim=-1)
    pooled = tower.transformer(x, causal=True, pool_index=eot_index)  # (B, width): the EOT rows
    return tower.ln_final(pooled) @ tower.text_projection
