"""One run at a time per output folder: rank 0 holds an exclusive lock on ``--output-dir`` while it trains.

The lock is ``flock`` on the folder itself (no lock file is written), taken before the run reads or
changes anything there; a second run started into the same folder exits 2 at once, having written nothing.
The kernel drops the lock when the process ends, however it ends, so a crashed run never leaves a stale
lock behind. On a file system without ``flock`` (some network mounts) the run goes on unprotected.
"""
from __future__ import annotations

import os
from pathlib import Path

_held: dict[str, int] = {}  # resolved folder -> the descriptor holding its lock (this process)


class RunFolderBusyError(ValueError):
    """Another process is training into this output folder."""


def lock_run_folder(folder: str | Path) -> None:
    """Hold the lock of ``folder`` (an existing folder) until :func:`release_run_folders`; re-entrant within
    one process. Raises RunFolderBusyError when another process holds it."""
    import fcntl

    key = str(Path(folder).resolve())
    if key in _held:
        return
    descriptor = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise RunFolderBusyError(f"--output-dir {folder} is in use: another fastclip run is training into it (it holds "
                                 "the folder's lock). Wait for that run to end, or give another --output-dir") from None
    except OSError:  # no flock here: carry on without the protection
        os.close(descriptor)
        return
    _held[key] = descriptor


def release_run_folders() -> None:
    """Release every run-folder lock this process holds (the end of ``fastclip.train.train``)."""
    while _held:
        _, descriptor = _held.popitem()
        os.close(descriptor)
