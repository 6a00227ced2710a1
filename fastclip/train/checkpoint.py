"""Atomic, verifiable, step-exact checkpoints, each tagged with the lineage (run) that wrote it.

Layout: ``<output-dir>/checkpoints/step_00000120/`` holding

- ``model.safetensors``: the weights (``fastclip.model.save_model``: OpenAI layout + the config);
- ``state.pt``: optimizer, GradScaler, schedule, data position and every rank's RNG states, all as
  tensors and plain Python types, so it loads with ``torch.load(weights_only=True)`` (no pickled code);
- ``manifest.json``: step, model name, the lineage (``run_id``, ``parent``), the batch and world size,
  and the SHA-256 of both files.

The format itself (file names, manifest, checksums, reading weights) is ``fastclip.checkpoint_format``,
which evaluation and model loading read too; this module writes, prunes and resumes.

A checkpoint is staged in a hidden folder and renamed into place whole (``fastclip.io.atomic_dir``),
so a crash leaves either the old set or the new one; an existing step folder is never overwritten.
Loading verifies the manifest's structure and both checksums: anything unreadable is a
:class:`CorruptCheckpointError`, and ``--resume`` falls back to the previous checkpoint.

A *lineage* is the chain of checkpoints written by one run and the resumes that continue it; it is
named by the ``run_id`` of the run that started it. ``--keep-last`` prunes only the lineage being
written, never the checkpoint just written, and never a folder whose manifest it cannot read.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fastclip.checkpoint_format import (MANIFEST_FILE, MANIFEST_FORMAT, MODEL_FILE, SHARDED_LAYOUT, STATE_FILE,
                                       STEP_PATTERN, CorruptCheckpointError, checkpoint_step, read_manifest, read_weights,
                                       sha256_of, step_folder_name, verify_checkpoint)
from fastclip.io import atomic_dir, atomic_write_json, fsync_dir, remove_stale_temporaries, temporary_prefix

logger = logging.getLogger("fastclip.train")

CORRUPT_SUFFIX = ".corrupt"
_STATE_KEYS = {"train": dict, "optimizer": dict, "rng": list, "world_size": int}


class CheckpointExistsError(ValueError):
    """A checkpoint of this step already exists: fastclip never overwrites one."""


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


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def remove_stale_staging(output_dir: str | Path) -> list[Path]:
    """Delete the hidden ``.step_N.*`` folders a killed writer or pruner left (call on the main rank, at start)."""
    return remove_stale_temporaries(checkpoint_dir(output_dir), STEP_PATTERN.pattern.strip("^$"))


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, state: dict, *,
                    model_name: str, run_id: str | None = None, parent: dict | None = None,
                    details: dict | None = None, keep_last: int = 0) -> Path:
    """Write checkpoint ``step`` atomically, then prune the lineage ``run_id`` to its newest ``keep_last``.

    model: the unwrapped model (not DDP). state: optimizer/scaler/schedule/data/RNG state, tensors and
    plain types only. parent: the checkpoint this lineage segment resumed from ({"run_id", "step",
    "path"}) or None. details: extra manifest fields (batch size, world size, ...). keep_last: 0 keeps
    all. Raises :class:`CheckpointExistsError` when ``step`` already has a folder. Returns the folder.
    """
    from fastclip.model import save_model

    final = new_checkpoint_path(output_dir, step)
    try:
        with atomic_dir(final) as staging:
            save_model(model, staging / MODEL_FILE)
            write_state_and_manifest(staging, state, {"step": step, "model": model_name, "run_id": run_id,
                                                      "parent": parent, **(details or {})})
    except FileExistsError as error:  # another writer got there between the check and the rename
        raise CheckpointExistsError(f"{final} appeared while it was being written: {error}") from error
    retire_most_recent_only(output_dir, run_id, keep=final)
    if keep_last > 0:
        prune_lineage(output_dir, run_id, keep_last, keep=final)
    return final


def new_checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` goes; CheckpointExistsError if it is already there."""
    final = checkpoint_dir(output_dir) / step_folder_name(step)
    if final.exists():
        raise CheckpointExistsError(
            f"{final} already exists and fastclip never overwrites a checkpoint; move it away or train into "
            "a new --output-dir")
    return final


def write_state_and_manifest(staging: Path, state: dict, fields: dict) -> None:
    """``state.pt`` and then ``manifest.json`` into a staging folder: ``fields`` plus the SHA-256 of every file
    there (the weights, or a sharded checkpoint's shards, are written before)."""
    with open(staging / STATE_FILE, "wb") as handle:
        torch.save(state, handle)
    names = sorted(entry.name for entry in staging.iterdir() if entry.is_file() and entry.name != MANIFEST_FILE)
    atomic_write_json(staging / MANIFEST_FILE, {"format": MANIFEST_FORMAT, **fields,
                                                "sha256": {name: sha256_of(staging / name) for name in names}})


def _retire(folder: Path) -> None:
    """Delete ``folder`` so that a kill at any moment leaves it whole or hidden: rename it to a hidden
    temporary (which :func:`remove_stale_staging` clears at the next start), then delete that."""
    retired = Path(tempfile.mkdtemp(dir=folder.parent, prefix=temporary_prefix(folder.name)))
    os.replace(folder, retired / folder.name)
    fsync_dir(folder.parent)
    shutil.rmtree(retired, ignore_errors=True)


def _lineage_manifests(output_dir: str | Path, run_id: str | None) -> list[tuple[Path, dict]]:
    """(folder, manifest) of the checkpoints of lineage ``run_id``, oldest first; unreadable ones left out."""
    mine = []
    for path in list_checkpoints(output_dir):
        try:
            manifest = read_manifest(path)
        except CorruptCheckpointError:
            continue
        if manifest.get("run_id") == run_id and run_id is not None:
            mine.append((path, manifest))
    return mine


def retire_most_recent_only(output_dir: str | Path, run_id: str | None, *, keep: Path) -> list[Path]:
    """Delete the checkpoints of lineage ``run_id`` written only for ``--save-most-recent`` (their manifest says
    ``most_recent_only``), except ``keep``: each is replaced by the next checkpoint, as open_clip's
    epoch_latest.pt is. Returns the folders deleted."""
    removed = [path for path, manifest in _lineage_manifests(output_dir, run_id)
               if manifest.get("most_recent_only") and path != keep]
    for path in removed:
        _retire(path)
    return removed


def prune_lineage(output_dir: str | Path, run_id: str | None, keep_last: int, *, keep: Path) -> list[Path]:
    """Delete the checkpoints of lineage ``run_id`` beyond the newest ``keep_last``; ``keep`` always stays.

    Checkpoints of other lineages and folders whose manifest cannot be read are never touched.
    Returns the folders deleted.
    """
    mine = [path for path, _ in _lineage_manifests(output_dir, run_id)]
    newest = set(mine[-keep_last:]) | {keep}
    removed = [path for path in mine if path not in newest]
    for path in removed:
        _retire(path)
    return removed


def set_aside_corrupt(path: Path) -> Path:
    """Rename a corrupt checkpoint folder to ``step_N.corrupt`` (``.corrupt-2``, ...): kept for inspection,
    no longer a checkpoint, and its step number free for the resumed run to write."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    count = 1
    while target.exists():
        count += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}-{count}")
    os.replace(path, target)
    fsync_dir(path.parent)
    return target


# ------------------------------------------------------------------------------------------ load


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders (``step_N``) under ``output_dir``, oldest first by step; not verified."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(path), path) for path in root.iterdir() if path.is_dir() and checkpoint_step(path)
             is not None]
    return [path for _, path in sorted(found)]


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    model_name: str
    state: dict
    manifest: dict

    @property
    def run_id(self) -> str | None:
        return self.manifest.get("run_id")

    @property
    def sharded(self) -> bool:
        """Written with ``--fsdp-checkpoint sharded`` (DCP shards instead of model.safetensors)."""
        return self.manifest.get("layout") == SHARDED_LAYOUT


def load_training_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Verify and read a trainer checkpoint folder: manifest and training state (weights are applied
    separately by :func:`load_weights_into`; ``fastclip.model.load_checkpoint`` reads only the weights).

    Raises CorruptCheckpointError naming what is wrong.
    """
    path = Path(path)
    manifest = verify_checkpoint(path)
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged archive
        raise CorruptCheckpointError(f"{path}: {STATE_FILE} cannot be loaded ({error})") from error
    wrong = [key for key, kind in _STATE_KEYS.items() if not isinstance(state, dict) or not isinstance(state.get(key), kind)]
    if wrong:
        raise CorruptCheckpointError(f"{path}: {STATE_FILE} lacks {wrong} (not a fastclip training state)")
    return LoadedCheckpoint(path=path, step=manifest["step"], model_name=manifest.get("model") or "",
                            state=state, manifest=manifest)


def describe_mismatch(weights: dict, model: torch.nn.Module, limit: int = 3) -> str | None:
    """A short account of how ``weights`` do not fit ``model`` (None when they fit)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    reshaped = [f"{key}: {tuple(weights[key].shape)} saved, {tuple(expected[key].shape)} here"
                for key in sorted(set(weights) & set(expected)) if weights[key].shape != expected[key].shape]
    if not (missing or unexpected or reshaped):
        return None
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)):
        if keys:
            parts.append(f"{len(keys)} tensor(s) {label} (e.g. {'; '.join(keys[:limit])})")
    return ", ".join(parts)


def load_weights_into(model: torch.nn.Module, checkpoint_path: str | Path) -> None:
    """Load ``model.safetensors`` of a checkpoint folder into ``model`` (strict).

    Weights that do not fit the model raise ValueError with a short summary (not every key).
    """
    from safetensors.torch import load_file

    weights = read_weights(Path(checkpoint_path) / MODEL_FILE, lambda path: load_file(str(path), device="cpu"))
    mismatch = describe_mismatch(weights, model)
    if mismatch:
        raise ValueError(f"the weights of {checkpoint_path} do not fit this model: {mismatch}. Resume with the "
                         "--model and --force-image-size of the run that wrote it")
    model.load_state_dict(weights, strict=True)


def find_resume_checkpoint(resume: str, output_dir: str | Path, log=logger.warning,
                           on_corrupt: Callable[[Path], None] | None = None) -> LoadedCheckpoint | None:
    """``resume`` = "latest" (newest valid in ``output_dir``) or a checkpoint folder.

    A corrupt checkpoint is reported through ``log`` (and handed to ``on_corrupt``) and the previous
    one is tried, down to the oldest. Returns None when ``resume="latest"`` finds nothing.
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
        step = checkpoint_step(chosen)
        older = [path for path in list_checkpoints(chosen.parent.parent)
                 if step is not None and checkpoint_step(path) < step]
        candidates = older + [chosen]
    for path in reversed(candidates):
        try:
            return load_training_checkpoint(path)
        except CorruptCheckpointError as error:
            log(f"checkpoint {path} is corrupt, trying the previous one: {error}")
            if on_corrupt is not None:
                on_corrupt(path)
    raise CorruptCheckpointError(f"no loadable checkpoint among {[str(path) for path in candidates]}")
