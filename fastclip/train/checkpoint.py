"""Atomic, verifiable, step-exact checkpoints.

Layout: ``<output-dir>/checkpoints/step_00000120/`` holding

- ``model.safetensors``: the weights (``fastclip.model.save_model``: OpenAI layout + the config);
- ``state.pt``: optimizer, GradScaler, schedule, data position and every rank's RNG states, all as
  tensors and plain Python types, so it loads with ``torch.load(weights_only=True)`` (no pickled code);
- ``manifest.json``: step, model name and the SHA-256 of both files, written last.

A checkpoint is written into a hidden temporary folder, each file fsync'ed, then the folder is renamed
into place (atomic on POSIX) and the parent fsync'ed, so a crash leaves either the old set or the new
one. Loading verifies the checksums; ``--resume latest`` reports a corrupt checkpoint and falls back to
the previous one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("fastclip.train")

MODEL_FILE, STATE_FILE, MANIFEST_FILE = "model.safetensors", "state.pt", "manifest.json"
_STEP_PATTERN = re.compile(r"^step_(\d+)$")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete, fails its checksum, or cannot be decoded."""


# ------------------------------------------------------------------------------------------- RNG


def capture_rng_state(device: torch.device) -> dict:
    """torch (CPU and this CUDA device), numpy and Python ``random`` states, as tensors/plain types."""
    python_version, python_state, python_gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": {"version": python_version, "state": torch.tensor(python_state, dtype=torch.int64),
                   "gauss": python_gauss},
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
    }
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)


# ------------------------------------------------------------------------------------------ save


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, state: dict, *,
                    model_name: str, keep_last: int = 0) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last`` (0 = all).

    model: the unwrapped model (not DDP). state: optimizer/scaler/schedule/data/RNG state, tensors and
    plain types only. Returns the checkpoint folder.
    """
    from fastclip.model import save_model

    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".step_{step:08d}."))
    try:
        save_model(model, staging / MODEL_FILE)  # fsync'ed by save_model
        with open(staging / STATE_FILE, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        manifest = {"step": step, "model": model_name,
                    "sha256": {name: _sha256(staging / name) for name in (MODEL_FILE, STATE_FILE)}}
        with open(staging / MANIFEST_FILE, "w") as handle:
            json.dump(manifest, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_path(staging)
        if final.exists():  # re-saving a step (e.g. after a resume): replace the old copy
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------ load


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete-looking checkpoint folders under ``output_dir``, oldest first (by step)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir()
             if path.is_dir() and (match := _STEP_PATTERN.match(path.name))]
    return [path for _, path in sorted(found)]


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    model_name: str
    state: dict


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Verify and read a checkpoint folder (weights are applied separately by :func:`load_weights_into`).

    Raises CorruptCheckpointError naming what is wrong.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{path}: unreadable {MANIFEST_FILE} ({error})") from error
    for name, expected in manifest.get("sha256", {}).items():
        if not (path / name).is_file():
            raise CorruptCheckpointError(f"{path}: {name} is missing")
        if _sha256(path / name) != expected:
            raise CorruptCheckpointError(f"{path}: {name} does not match its checksum (corrupt or truncated)")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged archive
        raise CorruptCheckpointError(f"{path}: {STATE_FILE} cannot be loaded ({error})") from error
    return LoadedCheckpoint(path=path, step=int(manifest["step"]), model_name=manifest.get("model", ""),
                            state=state)


def load_weights_into(model: torch.nn.Module, checkpoint_path: str | Path) -> None:
    """Load ``model.safetensors`` of a checkpoint folder into ``model`` (strict)."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(checkpoint_path) / MODEL_FILE), device="cpu")
    model.load_state_dict(weights, strict=True)


def find_resume_checkpoint(resume: str, output_dir: str | Path, log=logger.warning) -> LoadedCheckpoint | None:
    """``resume`` = "latest" (newest valid in ``output_dir``) or a checkpoint folder.

    A corrupt checkpoint is reported through ``log`` and the previous one is tried, down to the oldest.
    Returns None when ``resume="latest"`` finds nothing (a fresh start).
    """
    if resume == "latest":
        candidates = list_checkpoints(output_dir)
        if not candidates:
            return None
    else:
        chosen = Path(resume)
        if not chosen.is_dir():
            raise ValueError(f"--resume {resume!r} is not a checkpoint folder; give 'latest' or "
                             "<output-dir>/checkpoints/step_NNNNNNNN")
        older = [path for path in list_checkpoints(chosen.parent.parent) if path.name < chosen.name]
        candidates = older + [chosen]
    for path in reversed(candidates):
        try:
            return load_checkpoint(path)
        except CorruptCheckpointError as error:
            log(f"checkpoint {path} is corrupt, trying the previous one: {error}")
    raise CorruptCheckpointError(f"no loadable checkpoint among {[str(path) for path in candidates]}")
