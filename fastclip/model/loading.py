"""Build models by name, load OpenAI / open_clip / fastclip weights safely, save as safetensors.

Loading never runs pickled code: ``.pt``/``.pth``/``.bin``/``.ckpt`` go through
``torch.load(weights_only=True)`` and ``.safetensors`` through safetensors.

Accepted state-dict formats (all normalised to OpenAI's key layout, which fastclip uses):

- OpenAI: ``visual.*``, ``transformer.*``, ``token_embedding.weight``, ... possibly with the
  ``input_resolution`` / ``context_length`` / ``vocab_size`` entries of OpenAI's archives and
  fp16 weights (cast to the model's dtype on load).
- open_clip: the same keys (``CLIP``), or the ``text.``-prefixed text tower of ``CustomTextCLIP``;
  training checkpoints ``{"state_dict": {"module.visual...": ...}, "epoch": ...}`` too.
- fastclip: ``save_model`` writes the OpenAI layout plus the config in the safetensors metadata
  (so the image size and context length a model was trained at come back with it).

Where a file is taken, a trainer checkpoint folder is too (its ``model.safetensors``); ``create_model``
also takes open_clip pretrained tags already in the local caches (``pretrained``).
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F

from fastclip.io import atomic_write
from fastclip.precision import casts_every_tensor, check_precision, low_precision_dtype

from .attention import check_attn_impl
from .clip import CLIP, convert_weights_to_lp
from .config import CONFIGS, CLIPConfig, TextConfig, VisionConfig, get_config
from .pretrained import resolve_pretrained, weights_file

__all__ = ["create_model", "model_from_state_dict", "load_checkpoint", "normalize_state_dict", "infer_config",
           "likely_config_names", "save_model", "load_weights"]

PathLike = Union[str, os.PathLike]
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")
_CUSTOM_TEXT_PARTS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_METADATA_CONFIG_KEY = "fastclip_config"


# ----------------------------------------------------------------------------------------- reading


def load_checkpoint(path: PathLike) -> tuple:
    """Read a weights file or trainer checkpoint folder safely -> (state_dict in OpenAI layout, CLIPConfig or None).

    The config is present when the file was written by ``save_model`` (trainer checkpoints are).
    A missing path raises ``pretrained.WeightsNotFoundError`` (a FileNotFoundError and ValueError).
    """
    path = weights_file(path)
    config = None
    if path.is_dir():  # a sharded (DCP) trainer checkpoint
        from fastclip.checkpoint_format import read_sharded_weights

        raw, stored = read_sharded_weights(path)
        return normalize_state_dict(raw), CLIPConfig.from_dict(stored) if stored else None
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if _METADATA_CONFIG_KEY in metadata:
            config = CLIPConfig.from_dict(json.loads(metadata[_METADATA_CONFIG_KEY]))
        raw = load_file(str(path), device="cpu")
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raw = _torch_load_weights_only(path)
    else:
        raise ValueError(f"unknown checkpoint extension {path.suffix!r} for {path}: use .safetensors, .pt, .pth, "
                         ".bin or .ckpt")
    return normalize_state_dict(raw), config


def _torch_load_weights_only(path: Path):
    if _is_torchscript_archive(path):
        raise ValueError(
            f"{path} is a TorchScript archive (like OpenAI's original release files). Loading it runs its "
            "serialized code, which fastclip never does. If you trust the file, convert it once:\n"
            "  sd = torch.jit.load(path, map_location='cpu').state_dict()\n"
            "  safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\n"
            "or use open_clip's safetensors copy of the OpenAI weights (hf-hub timm/<model>.openai).")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds objects other than tensors and plain containers, which "
                         f"torch.load(weights_only=True) refuses to unpickle: {error}") from None


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())


def normalize_state_dict(checkpoint: Mapping) -> dict:
    """Any accepted format (see module docstring) -> a flat dict in OpenAI's key layout."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(checkpoint).__name__}")
    for wrapper in _WRAPPER_KEYS:
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
            break
    state_dict = {}
    for key, value in checkpoint.items():
        for prefix in _PREFIXES * 2:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith("text.") and key[5:].startswith(_CUSTOM_TEXT_PARTS):
            key = key[5:]  # open_clip CustomTextCLIP -> CLIP layout
        if key in _OPENAI_EXTRA_KEYS or key == "attn_mask":
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        state_dict[key] = value
    for key in ("logit_scale", "logit_bias"):
        if key in state_dict and state_dict[key].numel() == 1:
            state_dict[key] = state_dict[key].reshape(())  # open_clip's nonscalar_logit_scale stores (1,)
    if "text_projection.weight" in state_dict:
        raise ValueError("this checkpoint has a Linear text projection (open_clip proj_bias / HF text towers), "
                         "which fastclip's CLIP does not implement")
    return state_dict


# --------------------------------------------------------------------------------------- inference


def infer_config(state_dict: Mapping, quick_gelu: bool = False) -> CLIPConfig:
    """The architecture a state dict (OpenAI layout) was made with, as OpenAI's ``build_model`` reads it.

    Head counts are not visible in weights: a registered config with the same shapes supplies
    them; otherwise head width 64 is assumed (OpenAI's rule). The activation is not visible
    either and comes from ``quick_gelu``.
    """
    sd = state_dict
    try:
        if "visual.proj" in sd:
            width = sd["visual.conv1.weight"].shape[0]
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            layers = _count_blocks(sd, "visual.transformer.resblocks.")
            hidden = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
            vision = VisionConfig(image_size=patch * grid, layers=layers, width=width, patch_size=patch,
                                  mlp_ratio=hidden / width)
        else:
            stages = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{i}.")}) for i in range(1, 5))
            width = sd["visual.layer1.0.conv1.weight"].shape[0]
            grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(image_size=grid * 32, layers=stages, width=width, patch_size=None)
        text_width = sd["ln_final.weight"].shape[0]
        text_hidden = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        text = TextConfig(context_length=sd["positional_embedding"].shape[0],
                          vocab_size=sd["token_embedding.weight"].shape[0], width=text_width,
                          heads=max(1, text_width // 64), layers=_count_blocks(sd, "transformer.resblocks."),
                          mlp_ratio=text_hidden / text_width)
        config = CLIPConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text,
                            quick_gelu=quick_gelu,
                            init_logit_bias=float(sd["logit_bias"]) if "logit_bias" in sd else None)
    except KeyError as error:
        raise ValueError(f"not a CLIP state dict: key {error.args[0]!r} is missing "
                         f"(first keys: {sorted(state_dict)[:8]})") from None
    registered = [CONFIGS[name] for name in likely_config_names(config, sizes=False)]
    if registered:  # head counts are not visible in weights: take them from the registered twin
        twin = registered[0].replace(image_size=config.vision.image_size,
                                     context_length=config.text.context_length)
        config = CLIPConfig(embed_dim=config.embed_dim, vision=twin.vision, text=twin.text, quick_gelu=quick_gelu,
                            init_logit_scale=twin.init_logit_scale, init_logit_bias=config.init_logit_bias)
    return config


def _count_blocks(sd: Mapping, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def likely_config_names(config_or_state_dict, sizes: bool = True) -> list:
    """Registered names with the same parameter shapes (plain and -quickgelu variants).

    sizes=False also matches configs that differ only in image size / context length.
    """
    if not isinstance(config_or_state_dict, CLIPConfig):
        try:
            config_or_state_dict = infer_config(normalize_state_dict(config_or_state_dict))
        except ValueError:
            return []
    key = config_or_state_dict.architecture_key(sizes)
    return [name for name, config in CONFIGS.items() if config.architecture_key(sizes) == key]


def _describe(config: CLIPConfig) -> str:
    vision = config.vision
    tower = (f"ModifiedResNet layers={list(vision.layers)} width={vision.width}" if vision.is_resnet else
             f"ViT patch={vision.patch_size} width={vision.width} layers={vision.layers}")
    return (f"{tower} image_size={vision.image_size}; text width={config.text.width} layers={config.text.layers} "
            f"context={config.text.context_length}; embed_dim={config.embed_dim}")


# ----------------------------------------------------------------------------------------- loading


def load_weights(model: CLIP, state_dict: Mapping, *, assign: bool = False) -> None:
    """Load a normalised state dict into ``model`` strictly, resizing position embeddings if needed.

    Image position embeddings are resized bicubically (as open_clip does); text ones are cut to a
    shorter context (positions beyond it are never used) and cannot grow. ``assign=True`` makes the
    checkpoint's tensors the model's own (no copy: for tensors nobody else holds).
    """
    original, state_dict = state_dict, dict(state_dict)
    _resize_position_embeddings(model, state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(_mismatch_message(model.config, original, missing, unexpected, mismatched))
    model.load_state_dict(state_dict, strict=True, assign=assign)


def _mismatch_message(config, state_dict, missing, unexpected, mismatched) -> str:
    def listing(title, items):
        if not items:
            return ""
        shown = "\n".join(f"    {item}" for item in items[:12])
        more = f"\n    ... and {len(items) - 12} more" if len(items) > 12 else ""
        return f"\n  {title} ({len(items)}):\n{shown}{more}"

    lines = [f"checkpoint does not match the model ({_describe(config)})"]
    lines.append(listing("missing keys", missing) + listing("unexpected keys", unexpected)
                 + listing("shape mismatches", mismatched))
    try:
        inferred = infer_config(state_dict)
        lines.append(f"\n  {_fix_hint(config, inferred)}")
    except ValueError as error:
        lines.append(f"\n  could not infer the checkpoint's config: {error}")
    return "".join(lines)


def _fix_hint(config: CLIPConfig, inferred: CLIPConfig) -> str:
    """What to call instead: the registered name and the input sizes the weights were made for."""
    names = likely_config_names(inferred) or likely_config_names(inferred, sizes=False)
    if not names:
        return (f"the checkpoint looks like: {_describe(inferred)} (no registered name); "
                "create_model(None, pretrained=path) builds that model from the weights")
    sizes = {}
    registered = CONFIGS[names[0]]
    if inferred.vision.image_size != registered.vision.image_size:
        sizes["image_size"] = inferred.vision.image_size
    if inferred.text.context_length != registered.text.context_length:
        sizes["context_length"] = inferred.text.context_length
    call = ", ".join([repr(names[0]), "pretrained=path"] + [f"{key}={value}" for key, value in sizes.items()])
    flags = f"--model {names[0]}" + (f" --force-image-size {sizes['image_size']}" if "image_size" in sizes else "")
    return (f"the checkpoint looks like {' / '.join(names)}"
            + (f" at {', '.join(f'{key}={value}' for key, value in sizes.items())}" if sizes else "")
            + f": create_model({call}) loads it (fastclip train: {flags})")


def _resize_position_embeddings(model: CLIP, state_dict: dict) -> None:
    key = "visual.positional_embedding"
    if key in state_dict and not model.config.vision.is_resnet:
        old, new = state_dict[key], model.visual.positional_embedding
        if old.shape != new.shape and old.shape[1] == new.shape[1]:
            state_dict[key] = _resize_grid(old, model.config.vision.grid_size)
    key = "positional_embedding"
    if key in state_dict:
        old, context = state_dict[key], model.config.text.context_length
        if old.shape[0] > context and old.shape[1] == model.positional_embedding.shape[1]:
            state_dict[key] = old[:context].clone()


def _resize_grid(position_embedding: torch.Tensor, grid: int) -> torch.Tensor:
    cls, patches = position_embedding[:1], position_embedding[1:]
    old_grid = round(patches.shape[0] ** 0.5)
    if old_grid * old_grid != patches.shape[0]:
        return position_embedding  # not a square grid: leave it to the shape check
    image = patches.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = image.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(position_embedding.dtype)
    return torch.cat([cls, patches], dim=0)


def _build(config: CLIPConfig, *, attn_impl, grad_checkpointing, patch_dropout, device, dtype, precision,
           state_dict: Optional[Mapping] = None, owned: bool = False) -> CLIP:
    """The model of ``config``: random, or with ``state_dict`` loaded (taken over without a copy when
    ``owned``, i.e. freshly read from a file). Floating tensors end as ``dtype`` (default float32), then
    ``precision`` casts the matmul weights (bf16/fp16) or everything (pure_*), as open_clip's does."""
    check_attn_impl(attn_impl)
    if state_dict is None:  # random init, directly on the target device
        with torch.device(device if device is not None else "cpu"):
            model = CLIP(config, attn_impl=attn_impl, patch_dropout=patch_dropout)
    else:  # skip the random init: build on the meta device, then load every tensor
        with torch.device("meta"):
            model = CLIP(config, attn_impl=attn_impl, patch_dropout=patch_dropout)
        if not owned:
            model = model.to_empty(device="cpu")
        load_weights(model, state_dict, assign=owned)
        if dtype is None:
            dtype = torch.float32  # fp16 OpenAI weights -> fp32 model unless asked otherwise
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    weights_dtype = low_precision_dtype(precision)
    if weights_dtype is not None and casts_every_tensor(precision):
        model = model.to(weights_dtype)
    elif weights_dtype is not None:
        convert_weights_to_lp(model, weights_dtype)
    return model


def _check_precision_and_dtype(precision: str, dtype) -> None:
    check_precision(precision)
    if dtype is not None and low_precision_dtype(precision) is not None:
        raise ValueError(f"dtype={dtype} casts every tensor and precision={precision!r} sets the weights' dtypes: "
                         "give one of them (precision='pure_bf16' / 'pure_fp16' is dtype=torch.bfloat16 / float16)")


def create_model(name: Optional[str] = None, *, pretrained: Optional[PathLike] = None, attn_impl: str = "auto",
                 grad_checkpointing: bool = False, patch_dropout: float = 0.0, device=None, dtype=None,
                 precision: str = "fp32", quick_gelu: Optional[bool] = None, image_size: Optional[int] = None,
                 context_length: Optional[int] = None) -> CLIP:
    """Build the registered config ``name`` (see ``fastclip.model.config``), random or from weights.

    name: a registered config name; optional with ``pretrained=`` a file or folder, whose architecture
        is then read from it: a trainer checkpoint or ``save_model`` file records its whole config
        (image size and context length included); an OpenAI or open_clip state dict is inferred from
        its keys and shapes (``model_from_state_dict``), its image size from the position embedding.
    pretrained: a local ``.safetensors``/``.pt``/``.pth``/``.bin`` file in OpenAI, open_clip or
        fastclip format, a trainer checkpoint folder, or an open_clip pretrained tag of ``name``
        (``"openai"``, ``"laion2b_s34b_b79k"``, ...) already in the local open_clip / Hugging Face
        cache (``fastclip.model.pretrained``; nothing is downloaded).
        What the weights record wins over the name's defaults: the image size and context length
        stored by ``save_model`` (a model trained at 32 px reloads at 32 px), and the activation an
        open_clip tag was trained with (QuickGELU for ``"openai"``).
    attn_impl: "auto" | "sdpa" | "xformers" | "math", one attention op for both towers.
    grad_checkpointing: recompute every block in backward (non-reentrant), both towers.
    patch_dropout: FLIP patch dropout in training (ViT towers), e.g. 0.5.
    dtype: cast every floating tensor to this dtype (None: float32 for loaded weights).
    precision: open_clip's ``create_model(precision=)``: "fp32" and the "amp*" modes keep fp32 weights;
        "bf16"/"fp16" cast the matmul weights only (LayerNorm, embeddings, logit_scale stay fp32);
        "pure_bf16"/"pure_fp16" cast everything (``fastclip.precision``). Not together with ``dtype``.
    quick_gelu: the activation of weights that do not record it (an OpenAI or open_clip state dict
        read without a name); None: what the weights, the open_clip tag or the name say, else QuickGELU
        with a warning (``model_from_state_dict``).
    image_size / context_length: override the input sizes (embeddings are resized on load).
    The model is returned in train mode, like ``nn.Module``s are.
    """
    _check_precision_and_dtype(precision, dtype)
    options = dict(attn_impl=attn_impl, grad_checkpointing=grad_checkpointing, patch_dropout=patch_dropout,
                   device=device, dtype=dtype, precision=precision, image_size=image_size,
                   context_length=context_length)
    if pretrained is None:
        if name is None:
            raise ValueError("give a model name, or pretrained=path to read the config from the weights")
        config = get_config(name).replace(image_size=image_size, context_length=context_length)
        if quick_gelu is not None:
            config = config.replace(quick_gelu=quick_gelu)
        return _build(config, attn_impl=attn_impl, grad_checkpointing=grad_checkpointing,
                      patch_dropout=patch_dropout, device=device, dtype=dtype, precision=precision)
    weights = resolve_pretrained(pretrained, name)
    quick_gelu = weights.quick_gelu if quick_gelu is None else quick_gelu
    return model_from_state_dict(weights.path, name, quick_gelu=quick_gelu, **options)


def model_from_state_dict(state_dict: Union[Mapping, PathLike], name: Optional[str] = None, *,
                          quick_gelu: Optional[bool] = None, attn_impl: str = "auto",
                          grad_checkpointing: bool = False, patch_dropout: float = 0.0, device=None, dtype=None,
                          precision: str = "fp32", image_size: Optional[int] = None,
                          context_length: Optional[int] = None) -> CLIP:
    """A model for these weights, with the config inferred from the keys (OpenAI's ``build_model``).

    state_dict: a mapping (any accepted format), a weights file or a trainer checkpoint folder.
    name: use this registered config instead of inferring one; a config stored by ``save_model``
        still sets the image size, context length and activation (with a warning when the
        activation differs from the name's).
    quick_gelu: the activation, which plain weights do not record. Default: the config stored by
        ``save_model`` or given by ``name``; otherwise QuickGELU, as OpenAI's ``build_model`` does
        (with a warning: open_clip's LAION models use GELU, pass ``quick_gelu=False`` for them).
    dtype / precision: as in ``create_model``.
    image_size / context_length: override every other source of the input sizes.
    """
    _check_precision_and_dtype(precision, dtype)
    stored_config, owned = None, isinstance(state_dict, (str, os.PathLike))
    if owned:
        state_dict, stored_config = load_checkpoint(state_dict)
    else:
        state_dict = normalize_state_dict(state_dict)
    if name is not None:
        config = get_config(name)
        recorded = quick_gelu if quick_gelu is not None else (stored_config.quick_gelu if stored_config else None)
        if recorded is not None and recorded != config.quick_gelu:
            other = name[:-len("-quickgelu")] if name.endswith("-quickgelu") else f"{name}-quickgelu"
            warnings.warn(f"these weights were trained with {'QuickGELU' if recorded else 'GELU'}, which {name!r} "
                          f"does not use: building {other!r}'s activation instead (name {other!r} to silence this)",
                          UserWarning, stacklevel=2)
        if stored_config is not None:  # keep the sizes and activation the weights were saved with
            config = config.replace(image_size=stored_config.vision.image_size,
                                    context_length=stored_config.text.context_length,
                                    quick_gelu=stored_config.quick_gelu)
    elif stored_config is not None:
        config = stored_config
    else:
        if quick_gelu is None:
            names = " or ".join(likely_config_names(infer_config(state_dict))[:2]) or "a registered name"
            warnings.warn("the checkpoint does not record its activation; assuming QuickGELU like OpenAI's "
                          f"build_model. Pass quick_gelu=False (or name=, e.g. {names}) for GELU models.",
                          UserWarning, stacklevel=2)
            quick_gelu = True
        config = infer_config(state_dict, quick_gelu=quick_gelu)
    if quick_gelu is not None:
        config = config.replace(quick_gelu=quick_gelu)
    config = config.replace(image_size=image_size, context_length=context_length)
    return _build(config, attn_impl=attn_impl, grad_checkpointing=grad_checkpointing, patch_dropout=patch_dropout,
                  device=device, dtype=dtype, precision=precision, state_dict=state_dict, owned=owned)


# ------------------------------------------------------------------------------------------ saving


def save_model(model: CLIP, path: PathLike) -> Path:
    """Write ``model``'s weights and config to a ``.safetensors`` file, atomically.

    The file is a plain OpenAI-layout state dict that open_clip and OpenAI loaders read too; the
    config rides in the metadata so ``model_from_state_dict(path)`` rebuilds the exact model.
    """
    path = Path(path)
    for wrapper in ("_orig_mod", "module"):  # torch.compile / DistributedDataParallel wrappers
        model = getattr(model, wrapper, model)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_model writes safetensors; give a path ending in .safetensors, not {path.name!r}")
    from safetensors.torch import save

    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    metadata = {"format": "pt", _METADATA_CONFIG_KEY: json.dumps(model.config.to_dict())}
    with atomic_write(path, "wb") as handle:  # whole or not at all: temporary, fsync, rename
        handle.write(save(tensors, metadata=metadata))
    return path
