"""``CLIP``: an image tower and a text tower projected into one space, with a learned temperature.

The state-dict layout is OpenAI's (and open_clip's ``CLIP`` class): ``visual.*`` for the image
tower and the text tower at the top level (``token_embedding``, ``positional_embedding``,
``transformer.*``, ``ln_final``, ``text_projection``), then ``logit_scale`` (and ``logit_bias``).
So ``open_clip_model.load_state_dict(fastclip_model.state_dict())`` works strictly, and back.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, check_attn_impl
from .config import CLIPConfig
from .lock import lock_image_tower, lock_text_tower
from .resnet import ModifiedResNet
from .text import TEXT_TOWER_KEYS, TextTransformer, encode_text_tokens
from .vision import VisionTransformer

__all__ = ["CLIP", "convert_weights_to_lp"]


class CLIP(nn.Module):
    """CLIP model.

    ``model(image, text)`` returns ``{"image_features", "text_features", "logit_scale"}`` (features
    L2-normalised, ``logit_scale`` exponentiated) plus ``"logit_bias"`` for SigLIP-style configs, so
    ``ClipLoss()(**model(image, text), output_dict=True)`` works.
    """

    def __init__(self, config: CLIPConfig, *, attn_impl: str = "auto", patch_dropout: float = 0.0):
        super().__init__()
        check_attn_impl(attn_impl)
        self.config = config
        self.attn_impl = attn_impl
        if config.vision.is_resnet:
            if patch_dropout:
                raise ValueError("patch_dropout needs a ViT image tower; this config is a ModifiedResNet")
            self.visual = ModifiedResNet(config.vision, config.embed_dim, attn_impl)
        else:
            self.visual = VisionTransformer(config.vision, config.embed_dim, config.quick_gelu, attn_impl,
                                            patch_dropout)
        text = TextTransformer(config.text, config.embed_dim, config.quick_gelu, attn_impl)
        for name in TEXT_TOWER_KEYS:  # flat, OpenAI's layout (no "text." prefix)
            setattr(self, name, getattr(text, name))
        self.context_length = config.text.context_length
        self.vocab_size = config.text.vocab_size
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        if config.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        else:
            self.logit_bias = None
        self.initialize_parameters()

    @torch.no_grad()
    def initialize_parameters(self) -> None:
        """OpenAI's ``CLIP.initialize_parameters`` (the ViT tower keeps its construction-time init)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features ** -0.5
            for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(linear.weight, std=std)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for name, param in stage.named_parameters():
                    if name.endswith("bn3.weight"):
                        nn.init.zeros_(param)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        attn_std = width ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)
        self.logit_scale.fill_(float(self.config.init_logit_scale))
        if self.logit_bias is not None:
            self.logit_bias.fill_(float(self.config.init_logit_bias))

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (OpenAI's ``CLIP.dtype``)."""
        return self.text_projection.dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (non-reentrant), in both towers."""
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = enable

    def set_attn_impl(self, attn_impl: str) -> None:
        """Switch every attention op of both towers to ``attn_impl`` ("auto"|"sdpa"|"xformers"|"math")."""
        check_attn_impl(attn_impl)
        self.attn_impl = attn_impl
        for module in self.modules():
            if module is not self and hasattr(module, "attn_impl"):
                module.attn_impl = attn_impl

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """LiT: freeze the image tower but its last ``unlocked_groups`` layer groups (open_clip's method;
        see ``fastclip.model.lock``). Lock before building the optimiser."""
        lock_image_tower(self, unlocked_groups, freeze_bn_stats)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the text tower but its last ``unlocked_layers`` layer groups (open_clip's method;
        see ``fastclip.model.lock``)."""
        lock_text_tower(self, unlocked_layers, freeze_layer_norm)

    def no_weight_decay(self) -> set:
        """Names of parameters conventionally kept out of weight decay (embeddings, temperature)."""
        names = {"positional_embedding", "logit_scale"}
        if isinstance(self.visual, VisionTransformer):
            names |= {"visual.positional_embedding", "visual.class_embedding"}
        else:
            names.add("visual.attnpool.positional_embedding")
        if self.logit_bias is not None:
            names.add("logit_bias")
        return names

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """image: (B, 3, S, S), cast to the image tower's dtype -> (B, embed_dim)."""
        features = self.visual(image.to(self.visual.conv1.weight.dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """text: (B, L) token ids from ``fastclip.tokenize``, L <= context_length -> (B, embed_dim)."""
        features = encode_text_tokens(self, text)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None) -> dict:
        """-> {"image_features": (B, E) or None, "text_features": (B, E) or None, "logit_scale": (),
        and "logit_bias": () for SigLIP-style configs}; features L2-normalised."""
        output = {
            "image_features": self.encode_image(image, normalize=True) if image is not None else None,
            "text_features": self.encode_text(text, normalize=True) if text is not None else None,
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            output["logit_bias"] = self.logit_bias
        return output


def convert_weights_to_lp(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the matmul weights of ``model`` to ``dtype`` in place (open_clip's function of this name, which
    its ``precision="bf16"/"fp16"`` applies): the weight and bias of every Linear and Conv layer, the fused
    attention projection (``in_proj_weight``, ``in_proj_bias``), ``text_projection`` and the ViT's ``proj``.
    LayerNorm, BatchNorm, the embeddings, ``logit_scale`` and ``logit_bias`` keep their dtype. Returns ``model``.
    """
    def cast(parameter: Optional[nn.Parameter]) -> None:
        if parameter is not None:
            parameter.data = parameter.data.to(dtype)

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            cast(module.weight)
            cast(module.bias)
        elif isinstance(module, Attention):
            cast(module.in_proj_weight)
            cast(module.in_proj_bias)
        elif isinstance(module, VisionTransformer):
            cast(module.proj)
        if isinstance(module, (CLIP, TextTransformer)):
            cast(module.text_projection)
    return model
