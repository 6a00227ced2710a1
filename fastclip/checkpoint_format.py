"""The on-disk format of a trainer checkpoint folder, and reading it: what training, evaluation and model
loading share (the trainer writes and resumes in ``fastclip.train.checkpoint``; docs/design.md).

``<output-dir>/checkpoints/step_00000120/`` holds ``model.safetensors`` (the weights, with the config in
the metadata), ``state.pt`` (optimiser, schedule, data position, RNG) and ``manifest.json`` (step, model
name, lineage, and the SHA-256 of both files). :func:`verify_checkpoint` checks a folder against its
manifest; :func:`read_weights` turns what a damaged weights file raises into one
:class:`CorruptCheckpointError` that names the file.

A *sharded* checkpoint (``fastclip train --fsdp --fsdp-checkpoint sharded``; manifest ``"layout": "sharded"``)
holds torch.distributed.checkpoint (DCP) files instead of ``model.safetensors``: ``.metadata`` and one
``__<rank>_0.distcp`` per writing rank, with the model under ``model.*`` and the optimizer under
``optimizer.*``, plus ``state.pt`` and the manifest, which records the model config and the SHA-256 of
every file. :func:`read_sharded_weights` reads its weights in one process, whatever wrote them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Callable, TypeVar

MODEL_FILE, STATE_FILE, MANIFEST_FILE = "model.safetensors", "state.pt", "manifest.json"
MANIFEST_FORMAT = 2  # 1: step, model, sha256 only (no lineage); still readable
SHARDED_LAYOUT, DCP_METADATA_FILE = "sharded", ".metadata"
#: the files a manifest must list, by layout ("full": no "layout" key, as before sharded checkpoints)
REQUIRED_FILES = {"full": (MODEL_FILE, STATE_FILE), SHARDED_LAYOUT: (DCP_METADATA_FILE, STATE_FILE)}
STEP_PATTERN = re.compile(r"^step_(\d+)$")

T = TypeVar("T")


class CorruptCheckpointError(ValueError):
    """A checkpoint folder or weights file that is incomplete, fails its checksum, or cannot be decoded."""


def step_folder_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    """The step a ``step_N`` folder name says, or None for another name."""
    match = STEP_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | Path) -> dict:
    """The validated ``manifest.json`` of a checkpoint folder; CorruptCheckpointError if it is unusable."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{path}: unreadable {MANIFEST_FILE} ({error})") from error
    if not isinstance(manifest, dict):
        raise CorruptCheckpointError(f"{path}: {MANIFEST_FILE} holds a {type(manifest).__name__}, not an object")
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CorruptCheckpointError(f"{path}: {MANIFEST_FILE} has no valid 'step' (got {step!r})")
    folder_step = checkpoint_step(path)
    if folder_step is not None and folder_step != step:
        raise CorruptCheckpointError(f"{path}: {MANIFEST_FILE} says step {step}, the folder name step {folder_step}")
    layout = manifest.get("layout", "full")
    if layout not in REQUIRED_FILES:
        raise CorruptCheckpointError(f"{path}: {MANIFEST_FILE} has an unknown layout {layout!r}")
    checksums = manifest.get("sha256")
    if not isinstance(checksums, dict) or not all(isinstance(checksums.get(name), str)
                                                  for name in REQUIRED_FILES[layout]):
        raise CorruptCheckpointError(f"{path}: {MANIFEST_FILE} lacks the sha256 of "
                                     f"{' and '.join(REQUIRED_FILES[layout])}")
    for key in ("model", "run_id"):
        if manifest.get(key) is not None and not isinstance(manifest[key], str):
            raise CorruptCheckpointError(f"{path}: {MANIFEST_FILE} field {key!r} is not a string")
    return manifest


def verify_checkpoint(path: str | Path) -> dict:
    """Check a checkpoint folder: a valid manifest, every file it lists present and matching its checksum.

    Returns the manifest; raises CorruptCheckpointError naming what is wrong.
    """
    path = Path(path)
    manifest = read_manifest(path)
    for name in manifest["sha256"]:
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise CorruptCheckpointError(f"{path}: {MANIFEST_FILE} lists {name!r}, not a file of the folder")
        if not (path / name).is_file():
            raise CorruptCheckpointError(f"{path}: {name} is missing")
        if sha256_of(path / name) != manifest["sha256"][name]:
            raise CorruptCheckpointError(f"{path}: {name} does not match its checksum (corrupt or truncated)")
    return manifest


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder in the sharded (DCP) layout (not verified)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA_FILE).is_file() and (path / MANIFEST_FILE).is_file()


@contextlib.contextmanager
def dcp_in_one_process():
    """torch.distributed.checkpoint used by this process alone (``no_dist=True``), without DCP's warning that it
    assumes so: fastclip asks for it on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def read_sharded_weights(path: str | Path) -> tuple[dict, dict | None]:
    """The model weights of a sharded checkpoint folder, whole, on CPU -> (state dict, config dict or None).

    Verifies the folder first (every shard's checksum). Reads in this process alone (``no_dist``), so it
    works with or without a process group and whatever world size wrote the shards.
    """
    import torch
    from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata, load

    path = Path(path)
    manifest = verify_checkpoint(path)
    reader = FileSystemReader(str(path))
    prefix = "model."
    try:
        saved = reader.read_metadata().state_dict_metadata
        weights = {key[len(prefix):]: torch.empty(tuple(item.size), dtype=item.properties.dtype)
                   for key, item in saved.items() if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)}
        with dcp_in_one_process():
            load({"model": weights}, storage_reader=reader, no_dist=True)
    except Exception as error:  # DCP raises CheckpointException and others for damaged shards
        raise CorruptCheckpointError(f"{path}: the sharded weights cannot be read ({str(error).splitlines()[0]})") \
            from error
    if not weights:
        raise CorruptCheckpointError(f"{path}: the sharded checkpoint holds no model weights")
    return weights, manifest.get("config")


def _is_damaged_file_error(error: Exception) -> bool:
    """What safetensors and torch.load raise on a truncated, empty or garbled file (not on a bug)."""
    from safetensors import SafetensorError

    if isinstance(error, RuntimeError) and not isinstance(error, SafetensorError):
        return "PytorchStreamReader" in str(error) or "zip archive" in str(error)
    return isinstance(error, (SafetensorError, EOFError, OSError))


def read_weights(path: str | Path, reader: Callable[[Path], T]) -> T:
    """``reader(path)``, with the errors a damaged weights file raises turned into one
    CorruptCheckpointError naming the file (a missing file is a ValueError)."""
    path = Path(path)
    if not path.is_file() and not is_sharded_checkpoint(path):
        raise ValueError(f"weights file {str(path)!r} does not exist")
    try:
        return reader(path)
    except Exception as error:
        if not _is_damaged_file_error(error):
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CorruptCheckpointError(f"{path}: cannot be read as weights, the file is damaged or truncated "
                                     f"({message})") from error
