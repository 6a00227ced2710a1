"""fastclip: memory-linear fused CLIP/SigLIP losses, a distributed loss, a CLIP model and a trainer.

Importing ``fastclip`` is cheap: nothing touches the GPU at import time, and the heavier
subpackages (model, tokenizer, trainer) load on first use.
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it (loaded on first attribute access, PEP 562)
_LAZY_ATTRIBUTES = {
    "ClipLoss": "fastclip.loss",
    "SigLipLoss": "fastclip.loss",
    "clip_loss": "fastclip.loss",
    "siglip_loss": "fastclip.loss",
    "create_model": "fastclip.model",
    "model_from_state_dict": "fastclip.model",
    "tokenize": "fastclip.tokenizer",
    "image_transform": "fastclip.transforms",
}

__all__ = ["__version__", *_LAZY_ATTRIBUTES]


def __getattr__(name):
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fastclip' has no attribute {name!r}")
    return getattr(import_module(module_name), name)


def __dir__():
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))
