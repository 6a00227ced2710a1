"""Find pretrained weights that are already on this machine: fastclip never downloads.

``pretrained`` (in ``create_model`` and ``fastclip train --pretrained``) may be:

- a weights file: ``.safetensors``, ``.pt``, ``.pth``, ``.bin``, ``.ckpt`` (formats: ``loading``);
- a trainer checkpoint folder, ``<output-dir>/checkpoints/step_NNNNNNNN/`` (its ``model.safetensors``, or
  the model part of its shards when ``--fsdp-checkpoint sharded`` wrote it);
- an open_clip pretrained tag with a model name, e.g. ``create_model("ViT-B-32",
  pretrained="laion2b_s34b_b79k")`` or ``"openai"``. open_clip's registry (``open_clip.pretrained``,
  needed for tags) maps (name, tag) to a Hugging Face Hub repository and file, or a URL; the file is
  then looked up where open_clip's own download put it:

  - the Hugging Face Hub cache, ``<hub cache>/models--<org>--<repo>/snapshots/<revision>/<file>``,
    where ``<hub cache>`` is ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``,
    else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub`` (huggingface_hub's
    rules, read at call time); the safetensors copy is preferred, as open_clip does;
  - open_clip's URL cache, ``~/.cache/clip/<file name of the URL>`` (OpenAI's release files there are
    TorchScript archives, which fastclip refuses to unpickle: the error says how to convert one);
- ``"hf-hub:<org>/<repo>"`` (or ``"hf-hub:<org>/<repo>/<file>"``): that repository in the Hub cache.

The activation, which plain state dicts do not record, comes from open_clip's registry for a tag, else
from an ``open_clip_config.json`` beside the weights file (what open_clip's Hub repositories hold).

A tag that is not cached raises ``WeightsNotFoundError`` (a ``ValueError`` and ``FileNotFoundError``:
the CLI exits with status 2) naming every place it looked and the command that fetches the file.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import posixpath
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

from fastclip.checkpoint_format import MODEL_FILE, is_sharded_checkpoint

__all__ = ["Weights", "WeightsNotFoundError", "resolve_pretrained", "weights_file", "hub_cache_dir",
           "clip_url_cache_dir", "CHECKPOINT_WEIGHTS_FILE"]

PathLike = Union[str, os.PathLike]
CHECKPOINT_WEIGHTS_FILE = MODEL_FILE  # what a trainer checkpoint folder holds (fastclip.checkpoint_format)
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
HF_HUB_PREFIX = "hf-hub:"
OPEN_CLIP_HF_FILE = "open_clip_pytorch_model.bin"  # open_clip's default file in a Hub repository
OPEN_CLIP_HF_SAFE_FILE = "open_clip_model.safetensors"  # ... and its safetensors copy, preferred
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"  # beside them: {"model_cfg": {..., "quick_gelu": ...}, ...}


class WeightsNotFoundError(FileNotFoundError, ValueError):
    """The weights asked for are not on this machine (the message says where it looked and what to do)."""


@dataclass(frozen=True)
class Weights:
    """A local weights file, where it came from, and the activation its weights were trained with when
    the source says so (open_clip's registry records QuickGELU per tag)."""

    path: Path
    source: str
    quick_gelu: Optional[bool] = None


# ---------------------------------------------------------------------------------------- caches


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache folder, from the environment as huggingface_hub resolves it."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def clip_url_cache_dir() -> Path:
    """Where open_clip (and OpenAI's ``clip``) keep files downloaded from a URL."""
    return Path("~/.cache/clip").expanduser()


def _hub_repo_dir(repo_id: str) -> Path:
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _cached_hub_file(repo_id: str, filename: str) -> Optional[Path]:
    """The cached file of ``repo_id``'s main revision, or None (huggingface_hub reads the cache, offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hub_cache_dir()))
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def _safetensors_first(filename: str) -> list[str]:
    """open_clip's order: the safetensors copy of a ``.bin``/``.pth`` file, then the file itself."""
    if filename == OPEN_CLIP_HF_FILE:
        return [OPEN_CLIP_HF_SAFE_FILE, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


# ---------------------------------------------------------------------------------------- resolving


def weights_file(path: PathLike) -> Path:
    """A weights file, the ``model.safetensors`` of a trainer checkpoint folder, or a sharded checkpoint folder
    itself (``fastclip.checkpoint_format``; WeightsNotFoundError if none)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / CHECKPOINT_WEIGHTS_FILE).is_file():
            return path / CHECKPOINT_WEIGHTS_FILE
        if is_sharded_checkpoint(path):
            return path
        steps = sorted(path.glob(f"checkpoints/step_*/{CHECKPOINT_WEIGHTS_FILE}"))
        if steps:
            raise WeightsNotFoundError(f"{path} is a training run's output folder; give one of its checkpoint "
                                       f"folders, e.g. the newest: {steps[-1].parent}")
        raise WeightsNotFoundError(f"folder {path} holds no {CHECKPOINT_WEIGHTS_FILE}: give a weights file "
                                   "or a trainer checkpoint folder (<output-dir>/checkpoints/step_NNNNNNNN)")
    raise WeightsNotFoundError(f"no weights file or checkpoint folder at {path}")


def _looks_like_a_path(text: str) -> bool:
    return (os.sep in text or "/" in text or text.startswith(("~", "."))
            or text.lower().endswith(WEIGHTS_SUFFIXES))


def resolve_pretrained(pretrained: PathLike, model_name: Optional[str] = None) -> Weights:
    """The local file for ``pretrained`` (see the module docstring); never touches the network."""
    text = str(pretrained)
    if not isinstance(pretrained, os.PathLike) and text.startswith(HF_HUB_PREFIX):
        return _with_open_clip_config_activation(_resolve_hub_id(text[len(HF_HUB_PREFIX):]))
    if isinstance(pretrained, os.PathLike) or _looks_like_a_path(text) or os.path.exists(text):
        found = Weights(weights_file(pretrained), "checkpoint folder" if Path(text).expanduser().is_dir() else "file")
        return _with_open_clip_config_activation(found)
    return _resolve_open_clip_tag(text, model_name)


def _with_open_clip_config_activation(weights: Weights) -> Weights:
    """``weights`` with the activation that an ``open_clip_config.json`` beside the file records (open_clip's
    ``model_cfg.quick_gelu``, default False), when there is one that can be read."""
    sidecar = weights.path.parent / OPEN_CLIP_CONFIG_FILE
    if weights.quick_gelu is not None or not sidecar.is_file():
        return weights
    try:
        model_config = json.loads(sidecar.read_text(encoding="utf-8"))["model_cfg"]
        return replace(weights, quick_gelu=bool(model_config.get("quick_gelu", False)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return weights  # not open_clip's file: the weights alone decide, as without it


def _resolve_hub_id(hub_id: str) -> Weights:
    parts = hub_id.strip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"pretrained='{HF_HUB_PREFIX}{hub_id}' should name a repository: "
                         f"'{HF_HUB_PREFIX}<org>/<repo>' or '{HF_HUB_PREFIX}<org>/<repo>/<file>'")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or OPEN_CLIP_HF_FILE
    candidates = [("hub", repo_id, name) for name in _safetensors_first(filename)]
    return _first_cached(candidates, f"pretrained='{HF_HUB_PREFIX}{hub_id}'", None,
                         fetch=f"hf download {repo_id} {_safetensors_first(filename)[0]}")


def _open_clip_registry():
    try:
        return importlib.import_module("open_clip.pretrained")
    except ImportError:
        return None


def _resolve_open_clip_tag(tag: str, model_name: Optional[str]) -> Weights:
    if model_name is None:
        raise ValueError(f"pretrained={tag!r} is not a file or folder; as an open_clip pretrained tag it needs the "
                         f"model name, e.g. create_model('ViT-B-32', pretrained={tag!r}) (fastclip train: --model)")
    registry = _open_clip_registry()
    if registry is None:
        raise ValueError(f"pretrained={tag!r} is not a file or folder, and open_clip, whose registry maps pretrained "
                         "tags to files, is not installed (pip install open_clip_torch); or pass the weights "
                         "file's path")
    config = registry.get_pretrained_cfg(model_name, tag)
    if not config:
        tags = registry.list_pretrained_tags_by_model(model_name)
        known = (f"its tags for {model_name}: {', '.join(tags)}" if tags else
                 f"open_clip publishes no weights for {model_name!r} (open_clip.list_pretrained() lists them)")
        raise ValueError(f"pretrained={tag!r} is not a file or folder, nor an open_clip tag of {model_name!r}; {known}")
    candidates = []
    if config.get("file"):
        candidates.append(("file", config["file"], None))
    if config.get("hf_hub"):
        repo_id, filename = posixpath.split(config["hf_hub"])
        candidates += [("hub", repo_id, name) for name in _safetensors_first(filename or OPEN_CLIP_HF_FILE)]
    if config.get("url"):
        candidates.append(("file", str(clip_url_cache_dir() / posixpath.basename(config["url"])), None))
    fetch = f"python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{tag}')\""
    return _first_cached(candidates, f"pretrained={tag!r} for {model_name}", bool(config.get("quick_gelu", False)),
                         fetch=fetch)


def _first_cached(candidates, what: str, quick_gelu: Optional[bool], *, fetch: str) -> Weights:
    looked = []
    for kind, location, filename in candidates:
        if kind == "file":
            if os.path.isfile(location):
                return Weights(Path(location), f"{what} ({location})", quick_gelu)
            looked.append(location)
        else:
            found = _cached_hub_file(location, filename)
            if found is not None:
                return Weights(found, f"{what} (Hugging Face cache, {location})", quick_gelu)
            looked.append(str(_hub_repo_dir(location) / "snapshots" / "<main>" / filename))
    hub_note = ""
    if any(kind == "hub" for kind, _, _ in candidates) and importlib.util.find_spec("huggingface_hub") is None:
        hub_note = "\n(huggingface_hub is not installed, so the Hub cache could not be read: pip install huggingface_hub)"
    listing = "\n  ".join(looked)
    raise WeightsNotFoundError(
        f"{what}: the weights are not on this machine, and fastclip never downloads. Looked for:\n  {listing}"
        f"{hub_note}\nFetch them once (this fills the cache above), then run again:\n  {fetch}\n"
        "or pass the path of a weights file you have.")
