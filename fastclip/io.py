"""Crash-safe writes: the one place fastclip writes a file or a folder that a user may rely on.

    with atomic_write(path) as handle:          # text ("w", default) or bytes ("wb")
        handle.write(...)
    atomic_write_json(path, payload)            # valid JSON (NaN/inf become null)
    with atomic_dir(final_folder) as staging:   # fill ``staging``; it becomes ``final_folder`` whole
        save_files_into(staging)

Both write into a hidden temporary beside the target (``.<name>.<random>``, same file system), fsync
what they wrote, rename it into place (atomic on POSIX) and fsync the parent folder, so a crash at
any moment leaves either the old target or the new one, never a mix. On an exception the temporary
is removed and the target is untouched. ``remove_stale_temporaries`` clears what a SIGKILL left.
The target gets the permissions a plain ``open()`` / ``mkdir()`` would give it under the user's umask
(mkstemp / mkdtemp make their temporaries private, 0600 / 0700, which the rename would otherwise keep).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

PathLike = Union[str, os.PathLike]

__all__ = ["atomic_write", "atomic_write_json", "atomic_dir", "staging_dir", "publish_dir", "fsync_dir",
           "remove_stale_temporaries", "temporary_prefix"]


def temporary_prefix(name: str) -> str:
    """The hidden prefix of a target's temporaries: ``.<name>.`` (what ``remove_stale_temporaries`` matches)."""
    return f".{name}."


def fsync_dir(path: PathLike) -> None:
    """fsync a folder, so a rename inside it survives a power cut (a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(descriptor)


def _umask() -> int:
    """The process's umask, read without changing it (Linux /proc), else the usual 022."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(folder)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary beside ``path`` for writing; on success it replaces ``path`` atomically."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path.name), suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_dir(path.parent)


def _json_safe(value):
    """JSON has no NaN or infinity: they become null (``json.dump`` would write invalid ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def atomic_write_json(path: PathLike, payload, indent: int | None = 1) -> None:
    """Write ``payload`` as strictly valid JSON (non-finite floats as null), atomically."""
    with atomic_write(path) as handle:
        json.dump(_json_safe(payload), handle, indent=indent, allow_nan=False)
        handle.write("\n")


@contextlib.contextmanager
def atomic_dir(final: PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty hidden staging folder beside ``final``; on success it becomes ``final``.

    Every file in it is fsync'ed before the rename. An existing ``final`` raises FileExistsError
    unless ``replace=True``, in which case the old folder is swapped out only after the new one is
    complete (it is moved aside, the new one renamed in, then the old one deleted).
    """
    staging = staging_dir(final)
    try:
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        publish_dir(staging, final, replace=replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def staging_dir(final: PathLike) -> Path:
    """A new empty hidden folder beside ``final`` to fill and then :func:`publish_dir` (``atomic_dir``'s
    first half, for writers that are several processes: one creates it, all write, one publishes)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=temporary_prefix(final.name)))


def publish_dir(staging: PathLike, final: PathLike, *, replace: bool = False) -> None:
    """fsync everything in ``staging`` and rename it to ``final`` (``atomic_dir``'s second half)."""
    staging, final = Path(staging), Path(final)
    _fsync_tree(staging)
    if final.exists():
        if not replace:
            raise FileExistsError(f"{final} already exists")
        _swap_in(staging, final)
    else:
        os.replace(staging, final)
    fsync_dir(final.parent)


def _swap_in(staging: Path, final: Path) -> None:
    """Replace the folder ``final`` by ``staging``: move the old one aside, rename the new one in, delete the old.

    If renaming the new one in fails, the old one is moved back before the error propagates. A kill
    between the two renames leaves the old folder whole inside ``.<name>.old.<random>/``, which
    :func:`remove_stale_temporaries` puts back when ``final`` is missing.
    """
    retired = Path(tempfile.mkdtemp(dir=final.parent, prefix=temporary_prefix(final.name) + "old."))
    try:
        os.replace(final, retired / final.name)
    except BaseException:
        shutil.rmtree(retired, ignore_errors=True)
        raise
    try:
        os.replace(staging, final)
    except BaseException:
        os.replace(retired / final.name, final)
        shutil.rmtree(retired, ignore_errors=True)
        raise
    fsync_dir(final.parent)  # the new folder is in place before the old one is deleted
    shutil.rmtree(retired, ignore_errors=True)


# mkstemp/mkdtemp add 8 characters of [a-z0-9_]; atomic_write adds ".tmp"; atomic_dir's retired copy "old.".
_TEMPORARY = re.compile(r"^\.(?P<target>.+?)\.(?P<retired>old\.)?[a-z0-9_]{8}(\.tmp)?$")


def remove_stale_temporaries(folder: PathLike, target_pattern: str = r".+") -> list[Path]:
    """Delete the temporaries a killed writer left in ``folder`` whose target name matches ``target_pattern``.

    Only hidden entries shaped as this module makes them (``.<target>.<8 random chars>``) are touched;
    call it only where no other writer is running (e.g. at the start of a run, on the main rank).
    A folder that ``atomic_dir(replace=True)`` had moved aside when it was killed is put back when its
    target is missing (the user's data is never deleted). Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    target = re.compile(target_pattern)
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY.match(entry.name)
        if match is None or not target.fullmatch(match.group("target")):
            continue
        original = folder / match.group("target")
        if match.group("retired") and (entry / original.name).is_dir() and not original.exists():
            os.replace(entry / original.name, original)  # killed between atomic_dir's two renames
            fsync_dir(folder)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed
