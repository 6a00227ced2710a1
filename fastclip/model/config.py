"""Model configs: one dataclass per tower, a ``CLIPConfig`` tying them, and the registry of names.

Every name below builds the same architecture as the open_clip config of the same name (same
parameter names and shapes, same activation), so weights move between the two libraries unchanged:

=====================  ========================================================================
name                   architecture
=====================  ========================================================================
RN50, RN101            ModifiedResNet image towers at 224 px (OpenAI)
RN50x4/x16/x64         wider/deeper ModifiedResNets at 288/384/448 px (OpenAI)
ViT-B-32, ViT-B-16     ViT-Base image towers at 224 px (OpenAI)
ViT-L-14, ViT-L-14-336 ViT-Large at 224 / 336 px (OpenAI)
ViT-H-14, ViT-g-14,    LAION's larger ViTs (head width 80 / 88 / 104)
ViT-bigG-14
=====================  ========================================================================

Each name also exists as ``<name>-quickgelu`` (QuickGELU ``x * sigmoid(1.702 x)`` instead of the
exact GELU). OpenAI's released weights were trained with QuickGELU, so load them into the
``-quickgelu`` names; open_clip's LAION weights use the plain names.

Small configs for CPU work (fastclip's own; open_clip has no config of these names, but
``CLIPConfig.to_open_clip()`` builds the identical open_clip model):

``fastclip-tiny``
    The trainer's default CPU model: ViT image tower at 64 px, patch 8 (64 patches + CLS),
    width 192, 4 layers, 3 heads; text tower width 128, 4 layers, 2 heads, context 77;
    embed_dim 128. 9.0 M parameters, 6.3 M of them the 49,408 x 128 token embedding. Text
    shorter than 77 tokens is fine: ``create_model("fastclip-tiny", context_length=32)``, or feed
    ``tokenize(..., context_length=32)`` to the 77-position model (``encode_text`` takes any
    length up to the context).
``fastclip-tiny-siglip``
    ``fastclip-tiny`` with SigLIP's temperature and bias init (``logit_scale = ln 10``,
    ``logit_bias = -10``), so the model returns ``logit_bias``.
``ViT-Tiny-16``
    A DeiT-Tiny-sized image tower at the standard 224 px (patch 16, width 192, 12 layers,
    3 heads) with a 6-layer, width-256 text tower; embed_dim 256. For CPU runs on real images.
``RN-Tiny``
    A ModifiedResNet with one bottleneck per stage and width 32 at 64 px (2x2 attention pool),
    with the ``fastclip-tiny`` text tower; embed_dim 128.

``create_model(name, image_size=..., context_length=...)`` overrides the input sizes of any
config (the positional embeddings are sized to match).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

__all__ = [
    "VisionConfig", "TextConfig", "CLIPConfig", "CONFIGS", "list_models", "get_config",
]


@dataclass(frozen=True)
class VisionConfig:
    """Image tower. ``patch_size=None`` with a 4-tuple of ``layers`` is a ModifiedResNet."""

    image_size: int = 224
    layers: Union[int, Tuple[int, int, int, int]] = 12
    width: int = 768
    patch_size: Optional[int] = 16
    head_width: int = 64
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.is_resnet:
            if len(self.layers) != 4:
                raise ValueError(f"a ModifiedResNet needs 4 stage depths, got layers={self.layers}")
            if self.image_size % 32:
                raise ValueError(f"ModifiedResNet image_size must be a multiple of 32, got {self.image_size}")
        else:
            if not self.patch_size:
                raise ValueError("a ViT image tower needs patch_size (or give 4 stage depths for a ResNet)")
            if self.image_size % self.patch_size:
                raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        attention_width = self.width * 32 if self.is_resnet else self.width
        if attention_width % self.head_width:
            raise ValueError(f"vision attention width {attention_width} is not a multiple of head_width "
                             f"{self.head_width}")

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def heads(self) -> int:
        # ModifiedResNet: the attention pool runs on the width*32 feature map (OpenAI's rule).
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width

    @property
    def mlp_width(self) -> int:
        return _mlp_width(self.width, self.mlp_ratio)

    @property
    def grid_size(self) -> int:
        """Tokens per side: patches for a ViT, the final feature map for a ResNet."""
        return self.image_size // (32 if self.is_resnet else self.patch_size)


@dataclass(frozen=True)
class TextConfig:
    """Causal text transformer pooled at the EOT token (the highest token id)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not a multiple of heads {self.heads}")
        if self.context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {self.context_length}")

    @property
    def mlp_width(self) -> int:
        return _mlp_width(self.width, self.mlp_ratio)


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP model: both towers, the shared embedding size and the temperature init."""

    embed_dim: int
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: Optional[float] = None  # set for SigLIP-style models: the model returns logit_bias

    def replace(self, *, image_size: Optional[int] = None, context_length: Optional[int] = None,
                **changes) -> "CLIPConfig":
        """A copy with top-level fields changed and, optionally, new input sizes."""
        config = dataclasses.replace(self, **changes)
        if image_size is not None:
            config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=int(image_size)))
        if context_length is not None:
            config = dataclasses.replace(
                config, text=dataclasses.replace(config.text, context_length=int(context_length)))
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CLIPConfig":
        data = dict(data)
        vision = VisionConfig(**data.pop("vision", {}))
        text = TextConfig(**data.pop("text", {}))
        return cls(vision=vision, text=text, **data)

    def to_open_clip(self) -> dict:
        """Keyword arguments of ``open_clip.model.CLIP(**kwargs)`` building the same architecture."""
        vision = self.vision
        vision_cfg = {"image_size": vision.image_size, "layers": list(vision.layers) if vision.is_resnet
                      else vision.layers, "width": vision.width, "patch_size": vision.patch_size,
                      "head_width": vision.head_width, "mlp_ratio": vision.mlp_ratio}
        text = self.text
        text_cfg = {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                    "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio}
        kwargs = {"embed_dim": self.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg,
                  "quick_gelu": self.quick_gelu, "init_logit_scale": self.init_logit_scale}
        if self.init_logit_bias is not None:
            kwargs["init_logit_bias"] = self.init_logit_bias
        return kwargs

    def architecture_key(self, sizes: bool = True) -> tuple:
        """The fields that fix parameter names and shapes (what a state dict can tell apart).

        sizes=False leaves out image_size and context_length (position-embedding lengths).
        """
        vision, text = self.vision, self.text
        key = (self.embed_dim, self.init_logit_bias is not None, vision.layers, vision.width, vision.patch_size,
               vision.mlp_width, text.vocab_size, text.width, text.layers, text.mlp_width)
        return key + ((vision.image_size, text.context_length) if sizes else ())


def _mlp_width(width: int, mlp_ratio: float) -> int:
    # int() as open_clip does; the epsilon keeps ratios inferred from weights (hidden / width) exact.
    return int(width * mlp_ratio + 1e-4)


def _vit(image_size, layers, width, patch_size, head_width=64, mlp_ratio=4.0) -> VisionConfig:
    return VisionConfig(image_size=image_size, layers=layers, width=width, patch_size=patch_size,
                        head_width=head_width, mlp_ratio=mlp_ratio)


def _resnet(image_size, layers, width) -> VisionConfig:
    return VisionConfig(image_size=image_size, layers=tuple(layers), width=width, patch_size=None)


def _text(width, heads, layers=12, context_length=77) -> TextConfig:
    return TextConfig(context_length=context_length, width=width, heads=heads, layers=layers)


_TINY_TEXT = _text(128, 2, layers=4)

# Plain dict registry: name -> CLIPConfig. Values copied from open_clip's model_configs/*.json.
_BASE_CONFIGS = {
    "RN50": CLIPConfig(1024, _resnet(224, (3, 4, 6, 3), 64), _text(512, 8)),
    "RN101": CLIPConfig(512, _resnet(224, (3, 4, 23, 3), 64), _text(512, 8)),
    "RN50x4": CLIPConfig(640, _resnet(288, (4, 6, 10, 6), 80), _text(640, 10)),
    "RN50x16": CLIPConfig(768, _resnet(384, (6, 8, 18, 8), 96), _text(768, 12)),
    "RN50x64": CLIPConfig(1024, _resnet(448, (3, 15, 36, 10), 128), _text(1024, 16)),
    "ViT-B-32": CLIPConfig(512, _vit(224, 12, 768, 32), _text(512, 8)),
    "ViT-B-16": CLIPConfig(512, _vit(224, 12, 768, 16), _text(512, 8)),
    "ViT-L-14": CLIPConfig(768, _vit(224, 24, 1024, 14), _text(768, 12)),
    "ViT-L-14-336": CLIPConfig(768, _vit(336, 24, 1024, 14), _text(768, 12)),
    "ViT-H-14": CLIPConfig(1024, _vit(224, 32, 1280, 14, head_width=80), _text(1024, 16, layers=24)),
    "ViT-g-14": CLIPConfig(1024, _vit(224, 40, 1408, 14, head_width=88, mlp_ratio=4.3637),
                           _text(1024, 16, layers=24)),
    "ViT-bigG-14": CLIPConfig(1280, _vit(224, 48, 1664, 14, head_width=104, mlp_ratio=4.9231),
                              _text(1280, 20, layers=32)),
    # fastclip's small CPU configs (documented in the module docstring).
    "fastclip-tiny": CLIPConfig(128, _vit(64, 4, 192, 8), _TINY_TEXT),
    "fastclip-tiny-siglip": CLIPConfig(128, _vit(64, 4, 192, 8), _TINY_TEXT,
                                       init_logit_scale=math.log(10.0), init_logit_bias=-10.0),
    "ViT-Tiny-16": CLIPConfig(256, _vit(224, 12, 192, 16), _text(256, 4, layers=6)),
    "RN-Tiny": CLIPConfig(128, _resnet(64, (1, 1, 1, 1), 32), _TINY_TEXT),
}

CONFIGS = {
    **_BASE_CONFIGS,
    **{f"{name}-quickgelu": dataclasses.replace(config, quick_gelu=True) for name, config in _BASE_CONFIGS.items()},
}


def list_models() -> list:
    """Registered config names, sorted."""
    return sorted(CONFIGS)


def get_config(name: str) -> CLIPConfig:
    """The registered config of ``name``; a ``ValueError`` lists the known names otherwise."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(list_models())}") from None
