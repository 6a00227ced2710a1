"""fastclip: memory-linear fused CLIP/SigLIP losses, a distributed loss, a CLIP model and a trainer.

Importing ``fastclip`` is cheap: nothing touches the GPU at import time, and the heavier
subpackages (model, tokenizer, trainer) load on first use.
"""
import importlib.util
import sys
from importlib import import_module
from pathlib import Path

__version__ = "0.1.0"


def _checkout_kernels() -> None:
    """In a plain checkout on PYTHONPATH, ``fastclip.kernels`` is this tree's top-level ``kernels/``.

    An install maps that folder to fastclip.kernels (setup.py's package_dir), so a wheel has
    fastclip/kernels/ and nothing happens here. A checkout has no fastclip/kernels/: the package is
    registered from ../kernels/ (its __init__ imports nothing), ahead of any other tree's install.
    """
    here = Path(__file__).resolve().parent
    folder = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (folder / "__init__.py").is_file() or f"{__name__}.kernels" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(f"{__name__}.kernels", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # what an import of a subpackage sets on its parent


_checkout_kernels()

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
