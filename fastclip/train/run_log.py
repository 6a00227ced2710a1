"""The run folder's text records, as open_clip keeps them: ``out.log`` (the console) and ``params.txt``.

``out.log`` gets what the process prints on stdout and what it logs (warnings included), from the
start of the run; lines printed before the run folder exists are held in memory and written when the
folder is created (after every check has passed), so a refused run leaves no folder behind.
``params.txt`` lists every setting, ``name: value`` sorted as open_clip writes it; a resumed run appends
its own block under a ``# resumed from`` line, so no earlier record is lost.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path


class _Tee(io.TextIOBase):
    """Writes to ``stream`` and to ``record`` (a list of strings until :meth:`attach`, then a file)."""

    def __init__(self, stream):
        self.stream, self.held, self.file = stream, [], None

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.record(text)
        return len(text)

    def record(self, text: str) -> None:
        """Into the record only (log records: the console already gets them from logging's own handler)."""
        if self.file is not None:
            self.file.write(text)
            self.file.flush()
        else:
            self.held.append(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def attach(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")
        self.file.write("".join(self.held))
        self.file.flush()
        self.held = []


class _RecordOnly:
    def __init__(self, tee: _Tee):
        self.write, self.flush = tee.record, lambda: None


class ConsoleLog:
    """Holds what is printed; :meth:`attach` starts writing it (and what follows) to a file."""

    def __init__(self, tee: _Tee | None):
        self._tee = tee

    def attach(self, path: Path) -> None:
        if self._tee is not None:
            self._tee.attach(path)


@contextlib.contextmanager
def console_log(active: bool = True):
    """Copy stdout and log records into a :class:`ConsoleLog` while active (a no-op log when not)."""
    if not active:
        yield ConsoleLog(None)
        return
    tee = _Tee(sys.stdout)
    handler = logging.StreamHandler(_RecordOnly(tee))
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    previous, sys.stdout = sys.stdout, tee
    logging.getLogger().addHandler(handler)
    try:
        yield ConsoleLog(tee)
    finally:
        logging.getLogger().removeHandler(handler)
        sys.stdout = previous
        if tee.file is not None:
            tee.file.close()


def write_params(output_dir: Path, config, *, resumed_from: str | None) -> None:
    """Append the run's settings to ``output_dir/params.txt`` (open_clip's ``name: value`` lines, sorted)."""
    from fastclip import __version__

    lines = [f"# resumed from {resumed_from}"] if resumed_from else []
    settings = {**config.to_dict(), "fastclip_version": __version__}
    lines += [f"{name}: {settings[name]}" for name in sorted(settings)]
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "params.txt", "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
