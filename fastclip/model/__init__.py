"""fastclip's CLIP model: OpenAI's architecture, open_clip's config names, faster attention.

    model = fastclip.create_model("ViT-B-32", pretrained="open_clip_model.safetensors")
    model = fastclip.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")   # open_clip tag, cached locally
    out = model(images, fastclip.tokenize(captions))   # {"image_features", "text_features", "logit_scale"}

See ``config`` for the registered names (and the small CPU configs), ``attention`` for the
``attn_impl`` backends (``attention.attention`` is the functional op), ``loading`` for the
accepted weight formats and ``pretrained`` for what ``pretrained=`` may name (files, trainer
checkpoint folders, open_clip tags already in the local caches: nothing is downloaded).
"""
from .attention import ATTN_IMPLS, Attention, describe_backends
from .clip import CLIP
from .config import CONFIGS, CLIPConfig, TextConfig, VisionConfig, get_config, list_models
from .loading import (create_model, infer_config, likely_config_names, load_checkpoint, load_weights,
                      model_from_state_dict, normalize_state_dict, save_model)
from .lock import FrozenBatchNorm2d, lock_image_tower, lock_text_tower
from .pretrained import Weights, WeightsNotFoundError, resolve_pretrained
from .resnet import ModifiedResNet
from .text import TextTransformer
from .transformer import LayerNorm, QuickGELU, ResidualAttentionBlock, Transformer
from .vision import PatchDropout, VisionTransformer

configs = CONFIGS  # name -> CLIPConfig, the registry (plain dict)

__all__ = [
    "create_model", "model_from_state_dict", "save_model", "load_checkpoint", "load_weights", "normalize_state_dict",
    "infer_config", "likely_config_names", "resolve_pretrained", "Weights", "WeightsNotFoundError", "CLIP", "CLIPConfig", "VisionConfig", "TextConfig", "CONFIGS",
    "configs", "get_config", "list_models", "VisionTransformer", "ModifiedResNet", "TextTransformer", "Transformer",
    "ResidualAttentionBlock", "Attention", "ATTN_IMPLS", "describe_backends", "LayerNorm",
    "QuickGELU", "PatchDropout", "lock_image_tower", "lock_text_tower", "FrozenBatchNorm2d",
]
