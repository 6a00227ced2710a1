"""Record the fsync and rename system calls a piece of code makes, in order, to check durability.

A SIGKILL cannot show a missing fsync (the page cache survives it), so the tests that guard the
"temporary, fsync, rename, fsync the folder" promise watch the calls themselves:

    with SyscallSpy() as spy:
        atomic_write_json(path, payload)
    spy.assert_durable_renames([path])

Each fsync is recorded with the path its descriptor points at (``/proc/self/fd``, Linux), each
``os.replace`` / ``os.rename`` with its source and destination.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest


class SyscallSpy:
    def __init__(self):
        self.events: list[tuple] = []
        self._monkeypatch = pytest.MonkeyPatch()

    def __enter__(self):
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(descriptor):
            fd = descriptor if isinstance(descriptor, int) else descriptor.fileno()
            self.events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
            return real_fsync(descriptor)

        def renamer(real):
            def rename(source, destination, *args, **kwargs):
                self.events.append(("rename", Path(source).resolve(), Path(destination).resolve()))
                return real(source, destination, *args, **kwargs)
            return rename

        self._monkeypatch.setattr(os, "fsync", fsync)
        self._monkeypatch.setattr(os, "replace", renamer(real_replace))
        self._monkeypatch.setattr(os, "rename", renamer(real_rename))
        return self

    def __exit__(self, *exc):
        self._monkeypatch.undo()
        return False

    def renames(self) -> list[tuple[int, Path, Path]]:
        return [(index, event[1], event[2]) for index, event in enumerate(self.events) if event[0] == "rename"]

    def synced(self, path: Path, before: int | None = None, after: int | None = None) -> bool:
        """Whether ``path`` was fsync'ed between the events ``after`` and ``before`` (exclusive)."""
        window = self.events[(after + 1 if after is not None else 0):before]
        return ("fsync", Path(path).resolve()) in window

    def assert_durable_renames(self, renamed_into_place: list[Path]) -> None:
        """Each rename whose destination is in ``renamed_into_place`` moved fsync'ed content (the file,
        or every file and folder of the tree) and was followed by an fsync of the destination's folder."""
        wanted = {Path(path).resolve() for path in renamed_into_place}
        seen = set()
        for index, source, destination in self.renames():
            if destination not in wanted:
                continue
            seen.add(destination)
            if destination.is_dir():
                members = [destination, *destination.rglob("*")]
                unsynced = [member for member in members
                            if not self.synced(source / member.relative_to(destination), before=index)]
                assert not unsynced, f"renamed {source} -> {destination} before fsync of {unsynced}: {self.events}"
            else:
                assert self.synced(source, before=index), \
                    f"renamed {source} -> {destination} before fsync of the file: {self.events}"
            assert self.synced(destination.parent, after=index), \
                f"no fsync of {destination.parent} after renaming {destination.name} into it: {self.events}"
        assert seen == wanted, f"never renamed into place: {sorted(wanted - seen)}; events {self.events}"
