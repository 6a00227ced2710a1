"""fastclip.io: atomic files and folders survive a SIGKILL at any moment (old or new, never a mix), fsync
what they rename (watched through the system calls), and keep the old folder when a replace fails."""
import json
import multiprocessing
import os
import shutil
import signal
import time

import pytest

from fastclip.io import atomic_dir, atomic_write, atomic_write_json, remove_stale_temporaries
from tests.syscall_spy import SyscallSpy


def _slow_file_writer(path, started):
    with atomic_write(path) as handle:
        handle.write("new-" * 1000)
        handle.flush()
        started.set()
        time.sleep(60)  # killed here, mid-write


def _slow_dir_writer(path, started):
    with atomic_dir(path, replace=True) as staging:
        (staging / "a.txt").write_text("new")
        started.set()
        time.sleep(60)


@pytest.mark.parametrize("writer", [_slow_file_writer, _slow_dir_writer])
def test_sigkill_mid_write_leaves_the_old_target_and_a_removable_temporary(tmp_path, writer):
    target = tmp_path / "target"
    if writer is _slow_file_writer:
        target.write_text("old")
    else:
        target.mkdir()
        (target / "a.txt").write_text("old")
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    child = context.Process(target=writer, args=(target, started))
    child.start()
    assert started.wait(60), "the writer never started"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    kept = target.read_text() if target.is_file() else (target / "a.txt").read_text()
    assert kept == "old"
    leftovers = [entry.name for entry in tmp_path.iterdir() if entry.name != "target"]
    assert leftovers and all(name.startswith(".target.") for name in leftovers)
    removed = remove_stale_temporaries(tmp_path, r"target")
    assert sorted(path.name for path in removed) == sorted(leftovers)
    assert [entry.name for entry in tmp_path.iterdir()] == ["target"]


def test_atomic_write_replaces_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_write(target) as handle:
        handle.write("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write("second")
            raise RuntimeError("boom")
    assert target.read_text() == "first"
    assert [entry.name for entry in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_json_is_strict_json(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"a": float("nan"), "b": [1.0, float("inf")], "c": 2})
    assert json.loads(target.read_text(), parse_constant=lambda name: pytest.fail(f"invalid JSON {name}")) == \
        {"a": None, "b": [1.0, None], "c": 2}


def test_atomic_dir_refuses_to_overwrite_unless_asked(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as staging:
        (staging / "x").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic_dir(target) as staging:
            (staging / "x").write_text("2")
    assert (target / "x").read_text() == "1"
    with atomic_dir(target, replace=True) as staging:
        (staging / "x").write_text("3")
    assert (target / "x").read_text() == "3"
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["ckpt"]


def test_stale_cleanup_touches_only_its_own_temporaries(tmp_path):
    for name in (".gitignore", ".hidden.config", "step_1", ".step_1.abcd1234", ".other.abcd1234.tmp"):
        (tmp_path / name).write_text("x")
    removed = remove_stale_temporaries(tmp_path, r"step_\d+")
    assert [path.name for path in removed] == [".step_1.abcd1234"]
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [".gitignore", ".hidden.config",
                                                                    ".other.abcd1234.tmp", "step_1"]


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_write_fsyncs_the_file_before_and_the_folder_after_the_rename(tmp_path, existing):
    target = tmp_path / "sub" / "r.json"
    if existing:
        target.parent.mkdir()
        target.write_text("old")
    with SyscallSpy() as spy:
        atomic_write_json(target, {"a": 1})
    spy.assert_durable_renames([target])
    assert json.loads(target.read_text()) == {"a": 1}


@pytest.mark.parametrize("replace", [False, True])
def test_atomic_dir_fsyncs_every_file_and_folder_before_and_the_parent_after_the_rename(tmp_path, replace):
    target = tmp_path / "ckpt"
    if replace:
        target.mkdir()
        (target / "stale").write_text("old")
    with SyscallSpy() as spy:
        with atomic_dir(target, replace=replace) as staging:
            (staging / "a.bin").write_bytes(b"a" * 100)
            (staging / "nested").mkdir()
            (staging / "nested" / "b.txt").write_text("b")
    spy.assert_durable_renames([target])
    assert sorted(path.name for path in target.rglob("*")) == ["a.bin", "b.txt", "nested"]


def _fail_on_rename_into(monkeypatch, target, error=OSError("injected: rename failed")):
    """Make os.replace raise the first time it would move something onto ``target`` (the new folder
    coming in; a later rename onto it, putting the old folder back, works)."""
    real_replace, failed = os.replace, []

    def replace(source, destination):
        if os.path.abspath(destination) == os.path.abspath(target) and not failed:
            failed.append(source)
            raise error
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("error", [OSError("injected"), KeyboardInterrupt()])
def test_a_failed_replace_keeps_the_old_folder_in_place(tmp_path, monkeypatch, error):
    target = tmp_path / "data"
    target.mkdir()
    (target / "x").write_text("old")
    _fail_on_rename_into(monkeypatch, target, error)
    with pytest.raises(type(error)):
        with atomic_dir(target, replace=True) as staging:
            (staging / "x").write_text("new")
    monkeypatch.undo()
    assert (target / "x").read_text() == "old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["data"]  # no staging or retired copy left


def test_a_failed_cleanup_of_the_old_folder_still_leaves_the_new_one(tmp_path, monkeypatch):
    target = tmp_path / "data"
    target.mkdir()
    (target / "x").write_text("old")
    monkeypatch.setattr(shutil, "rmtree", lambda path, ignore_errors=False: None)  # the old copy stays behind
    with atomic_dir(target, replace=True) as staging:
        (staging / "x").write_text("new")
    monkeypatch.undo()
    assert (target / "x").read_text() == "new"
    remove_stale_temporaries(tmp_path, "data")  # the leftover old copy is garbage now: removed, not restored
    assert [entry.name for entry in tmp_path.iterdir()] == ["data"] and (target / "x").read_text() == "new"


def test_a_kill_between_the_two_renames_is_undone_by_the_stale_cleanup(tmp_path, monkeypatch):
    """SIGKILL after the old folder was moved aside and before the new one came in: the old one is only
    hidden, and the next start's cleanup puts it back instead of deleting it."""
    target = tmp_path / "data"
    target.mkdir()
    (target / "x").write_text("old")

    class Killed(BaseException):
        """Stands for SIGKILL: from the second rename on nothing runs, not even the error handling."""

    real_replace, calls = os.replace, []

    def replace(source, destination):
        calls.append(destination)
        if len(calls) > 1:
            raise Killed()
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
    with pytest.raises(Killed):
        with atomic_dir(target, replace=True) as staging:
            (staging / "x").write_text("new")
    monkeypatch.undo()
    assert not target.exists()  # the state a kill at that moment leaves
    remove_stale_temporaries(tmp_path, "data")
    assert (target / "x").read_text() == "old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["data"]
