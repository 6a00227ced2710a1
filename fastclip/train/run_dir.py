"""The output folder of a run: checked before training, and the rules that keep every saved checkpoint.

Decided on the main rank before the model is built (:func:`prepare_output`):

- the folder is ``--output-dir``, or ``--logs``/``--name`` (open_clip's layout), or ``./runs/<time>``;
- the folder (and its ``checkpoints/``) must be a writable folder or creatable, else exit 2; nothing is
  created until every check of the run has passed (the first file written creates them);
- a **fresh run** (no ``--resume``) refuses a folder that already holds an earlier run's checkpoints,
  ``metrics.jsonl`` or ``results.json``: pass ``--resume latest`` or a new ``--output-dir``;
- ``--resume latest`` continues the lineage in the folder from its newest loadable checkpoint
  (corrupt ones are renamed ``step_N.corrupt`` and the previous one is used); with no checkpoint it
  starts from scratch there; without ``--output-dir`` it resumes the newest run under ``./runs``;
- ``--resume <folder>`` inside the output folder continues that lineage only if no later checkpoint
  exists there (a later one would be overwritten, so that is refused); a checkpoint from elsewhere
  **branches**: a new lineage in an output folder that holds no checkpoint yet, whose manifests name
  the parent checkpoint.

Each run gets a ``run_id``; checkpoints record it, and ``--keep-last`` prunes only that lineage.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastclip.train.checkpoint import (CorruptCheckpointError, LoadedCheckpoint, checkpoint_dir, checkpoint_step,
                                       find_resume_checkpoint, list_checkpoints, read_manifest, remove_stale_staging,
                                       set_aside_corrupt)
from fastclip.train.config import TrainConfig
from fastclip.train.metrics import METRICS_FILE
from fastclip.train.run_lock import lock_run_folder

RESULTS_FILE = "results.json"
RUNS_ROOT = "runs"  # where runs without --output-dir go
LOGS_ROOT = "logs"  # open_clip's --logs default, for --name without --logs


@dataclass
class RunPlan:
    """What rank 0 decided; small and picklable, so it is broadcast to every rank."""

    output_dir: str
    run_id: str
    resume_path: str | None = None            # the checkpoint folder to load, or None for a fresh start
    parent: dict | None = None                # {"run_id", "step", "path"} of the checkpoint resumed from
    created: list[str] = field(default_factory=list)  # folders this run created for its output, deepest first
    notes: list[str] = field(default_factory=list)


def timestamped_output_dir(root: str = RUNS_ROOT) -> str:
    """``<root>/<date_time>``, with ``-2``, ``-3`` ... appended when a run started in the same second."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    candidate, count = os.path.join(root, stamp), 1
    while os.path.exists(candidate):
        count += 1
        candidate = os.path.join(root, f"{stamp}-{count}")
    return candidate


def open_clip_run_name(config: TrainConfig, root: str | Path) -> str:
    """open_clip's default ``--name``: ``<date>-model_<model>-lr_<lr>-b_<batch>-j_<workers>-p_<precision>``,
    with ``-2``, ``-3`` ... appended when that folder exists under ``root``."""
    stamp = datetime.datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    name = "-".join([stamp, f"model_{config.model.replace('/', '-')}", f"lr_{config.lr}", f"b_{config.batch_size}",
                     f"j_{config.workers}", f"p_{config.precision}"])
    candidate, count = name, 1
    while (Path(root) / candidate).exists():
        count += 1
        candidate = f"{name}-{count}"
    return candidate


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]  # os.urandom: leaves every seeded RNG alone


def newest_run_dir(root: str | Path = RUNS_ROOT) -> Path | None:
    """The run folder under ``root`` whose newest checkpoint was written last, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    written = {}
    for run in root.iterdir():
        checkpoints = list_checkpoints(run) if run.is_dir() else []
        if checkpoints:
            written[run] = max(path.stat().st_mtime for path in checkpoints)
    return max(written, key=written.get) if written else None


def check_output_dir(output_dir: str | Path, *, saves_checkpoints: bool) -> None:
    """ValueError unless ``output_dir`` (and ``checkpoints/`` when the run saves) is a writable folder or can be
    created as one. Creates nothing: the folders appear when the run writes its first file, after every check."""
    output_dir = Path(output_dir)
    folders = [output_dir] + ([checkpoint_dir(output_dir)] if saves_checkpoints else [])
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--output-dir: {folder} is a file, not a folder; give --output-dir a folder")
    existing = folders[-1]
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output-dir: cannot write in {folders[-1]}: {existing} is a file, not a folder; give "
                         "another --output-dir")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(f"--output-dir: cannot write in {existing} ({error.strerror or error}); "
                         "give a writable --output-dir") from None


def _earlier_outputs(output_dir: Path) -> list[str]:
    """What an earlier run left in ``output_dir``: checkpoint entries, metrics.jsonl, results.json."""
    found = []
    root = checkpoint_dir(output_dir)
    if root.is_dir():
        found += sorted(f"checkpoints/{entry.name}" for entry in root.iterdir() if not entry.name.startswith("."))
    metrics = output_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size:
        found.append(METRICS_FILE)
    if (output_dir / RESULTS_FILE).exists():
        found.append(RESULTS_FILE)
    return found


def _listing(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def prepare_output(config: TrainConfig) -> tuple[RunPlan, LoadedCheckpoint | None]:
    """Main rank: pick the output folder, check it, and decide which checkpoint (if any) to resume.

    Raises ValueError / CorruptCheckpointError (exit 2) with the fix. Returns the plan and the
    checkpoint already loaded here (None for a fresh start), so rank 0 does not read it twice.
    """
    notes = []
    logs = config.logs or LOGS_ROOT  # open_clip's layout: the run folder is logs/name
    open_clip_layout = config.logs is not None or config.name is not None
    if config.output_dir is None and config.name is None and config.resume == "latest":
        root = logs if open_clip_layout else RUNS_ROOT
        found = newest_run_dir(root)
        if found is None:
            raise ValueError(f"--resume latest without {'--name' if open_clip_layout else '--output-dir'} resumes "
                             f"the newest run under {root}, and no run there has a checkpoint; pass "
                             f"{'--name <the run folder under --logs>' if open_clip_layout else '--output-dir <the run folder>'}")
        notes.append(f"--resume latest: resuming the newest run under {root}: {found}")
        output_dir = found
    elif open_clip_layout:
        output_dir = Path(logs) / (config.name or open_clip_run_name(config, logs))
    else:
        output_dir = Path(config.output_dir if config.output_dir is not None else timestamped_output_dir())
    created = [str(folder) for folder in (output_dir, *output_dir.parents) if not folder.exists()]  # deepest first
    with contextlib.suppress(OSError):  # what is wrong with the folder, check_output_dir says
        output_dir.mkdir(parents=True, exist_ok=True)
    try:
        plan, loaded = _plan_in(output_dir, config, notes)
    except BaseException:
        remove_created_folders(created)  # a refused run leaves nothing behind
        raise
    plan.created = created
    return plan, loaded


def remove_created_folders(created: list[str]) -> None:
    """Remove the folders a run created for its output (deepest first) while they are still empty."""
    for folder in created:
        try:
            os.rmdir(folder)
        except OSError:
            return


def _plan_in(output_dir: Path, config: TrainConfig, notes: list[str]) -> tuple[RunPlan, LoadedCheckpoint | None]:
    if output_dir.is_dir():
        lock_run_folder(output_dir)  # before anything is read or changed there: a second run into it exits 2
    check_output_dir(output_dir, saves_checkpoints=bool(config.save_frequency or config.save_every_n_steps))
    corrupt = []

    def report_corrupt(message: str) -> None:
        notes.append("WARNING: " + message)

    def set_aside(path: Path) -> None:
        if path.parent.resolve() == checkpoint_dir(output_dir).resolve():
            corrupt.append(set_aside_corrupt(path))  # frees the step for this run, keeps the files

    if not config.resume:
        earlier = _earlier_outputs(output_dir)
        if earlier:
            raise ValueError(f"--output-dir {output_dir} already holds an earlier run's {_listing(earlier)}; "
                             "fastclip never overwrites them. Pass --resume latest to continue that run, or give "
                             "a new --output-dir")
        loaded = None
    elif config.resume == "latest":
        lineages = {_lineage_of(path) for path in list_checkpoints(output_dir)} - {None}
        if len(lineages) > 1:
            raise ValueError(f"--resume latest: {checkpoint_dir(output_dir)} holds checkpoints of {len(lineages)} "
                             f"different runs ({_listing(sorted(lineages))}), so 'latest' is ambiguous; pass "
                             "--resume <checkpoint folder> and a new --output-dir")
        loaded = find_resume_checkpoint("latest", output_dir, log=report_corrupt, on_corrupt=set_aside)
        if loaded is None:
            if (output_dir / RESULTS_FILE).exists():
                raise ValueError(f"--resume latest: {output_dir} holds the results.json of a finished run but no "
                                 "checkpoint to resume; give a new --output-dir")
            notes.append(f"--resume latest: no checkpoint in {output_dir}, starting from scratch")
    else:
        loaded = find_resume_checkpoint(config.resume, output_dir, log=report_corrupt, on_corrupt=set_aside)
    if corrupt:
        notes.append(f"corrupt checkpoint(s) kept as {_listing([str(path) for path in corrupt])}")

    run_id, parent = new_run_id(), None
    if loaded is not None:
        parent = {"run_id": loaded.run_id, "step": loaded.step, "path": str(loaded.path.resolve())}
        inside = loaded.path.resolve().parent == checkpoint_dir(output_dir).resolve()
        if inside:
            later = [path.name for path in list_checkpoints(output_dir) if checkpoint_step(path) > loaded.step]
            if later:
                raise ValueError(f"--resume {loaded.path} is older than the checkpoint(s) saved after it in "
                                 f"{output_dir} ({_listing(later)}), which resuming there would write over. Resume "
                                 "the newest with --resume latest, or branch from it into a new --output-dir (the "
                                 "checkpoint is read from where it is)")
            run_id = loaded.run_id or run_id  # continue the lineage (a pre-lineage checkpoint starts one)
        else:
            earlier = [name for name in _earlier_outputs(output_dir) if name.startswith("checkpoints/")
                       or name == RESULTS_FILE]
            if earlier:
                raise ValueError(f"--resume {loaded.path} would branch into {output_dir}, which already holds "
                                 f"{_listing(earlier)}; give a new --output-dir for the branch, or --resume latest to "
                                 f"continue the run in {output_dir}")
            notes.append(f"branching from {loaded.path} into {output_dir} (a new lineage; its checkpoints name "
                         "their parent)")
    removed = remove_stale_staging(output_dir)
    if removed:
        notes.append(f"removed {len(removed)} half-written checkpoint folder(s) left by a crash: "
                     f"{_listing([path.name for path in removed])}")
    plan = RunPlan(output_dir=str(output_dir), run_id=run_id, parent=parent,
                   resume_path=str(loaded.path) if loaded is not None else None, notes=notes)
    return plan, loaded


def _lineage_of(path: Path) -> str | None:
    try:
        return read_manifest(path).get("run_id")
    except CorruptCheckpointError:
        return None
