"""fastclip.io: atomic files and folders survive a SIGKILL at any moment (old or new, never a mix)."""
import json
import multiprocessing
import os
import signal
import time

import pytest

from fastclip.io import atomic_dir, atomic_write, atomic_write_json, remove_stale_temporaries


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
