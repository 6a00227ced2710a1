"""Checkpoints: a run killed (SIGKILL) at step k and resumed gives the per-step losses of an uninterrupted
run; corrupt checkpoints are reported and the previous one used; atomic writes (fsync'ed, watched
through the system calls) and keep-last-N."""
import os
import signal
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from fastclip.train import checkpoint
from fastclip.train.main import main
from tests.syscall_spy import SyscallSpy
from tests.train_utils import logged_losses, run_with_fault, tiny_clip, tiny_state

KILL_AT_STEP = 8  # mid second epoch (6 steps per epoch), so the data position is mid-epoch


def tiny_run_args(output_dir, *extra):
    """12 fp32 CPU steps of fastclip-tiny at 32 px on the synthetic set, with patch dropout (RNG in play)
    and a DataLoader worker (worker seeding in play)."""
    return ["--dataset-type", "synthetic", "--train-num-samples", "96", "--batch-size", "16", "--epochs", "2",
            "--force-image-size", "32", "--workers", "1", "--patch-dropout", "0.25", "--lr", "1e-3",
            "--warmup", "3", "--seed", "11", "--no-progress", "--save-every-n-steps", "4",
            "--output-dir", str(output_dir), *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    assert main(tiny_run_args(output_dir, "--keep-last", "2")) == 0
    return output_dir


def test_killed_and_resumed_run_matches_the_uninterrupted_one_step_for_step(uninterrupted, tmp_path):
    killed = run_with_fault(f"kill-after-save:{KILL_AT_STEP}", tiny_run_args(tmp_path), timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    steps = [int(path.name.split("_")[1]) for path in checkpoint.list_checkpoints(tmp_path)]
    assert steps[-1] == KILL_AT_STEP

    assert main(tiny_run_args(tmp_path, "--resume", "latest")) == 0
    expected, resumed = logged_losses(uninterrupted), logged_losses(tmp_path)
    assert sorted(expected) == list(range(1, 13))
    assert resumed == expected  # bitwise: same floats at every step, before and after the kill

    final_expected = load_file(str(checkpoint.list_checkpoints(uninterrupted)[-1] / "model.safetensors"))
    final_resumed = load_file(str(checkpoint.list_checkpoints(tmp_path)[-1] / "model.safetensors"))
    assert all(torch.equal(final_expected[key], final_resumed[key]) for key in final_expected)


def test_keep_last_keeps_the_newest_checkpoints(uninterrupted):
    names = [path.name for path in checkpoint.list_checkpoints(uninterrupted)]
    assert names == ["step_00000008", "step_00000012"]


def _copy_run(source, destination):
    import shutil

    shutil.copytree(source, destination)
    return checkpoint.list_checkpoints(destination)


def _flip_a_byte_inside_a_tensor(state_file):
    """Flip one byte in the middle of the largest tensor's storage inside state.pt's zip archive: the
    file still loads (torch does not check the archive's CRCs), only with another number in it."""
    with zipfile.ZipFile(state_file) as archive:
        record = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda info: info.file_size)
    data = bytearray(state_file.read_bytes())
    name_length, extra_length = int.from_bytes(data[record.header_offset + 26:record.header_offset + 28], "little"), \
        int.from_bytes(data[record.header_offset + 28:record.header_offset + 30], "little")
    position = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
    before = torch.load(state_file, weights_only=True)
    data[position] ^= 0x40
    state_file.write_bytes(bytes(data))
    after = torch.load(state_file, weights_only=True)  # still loads: only the checksum can tell
    changed = [name for name, tensor in _tensors(after) if not torch.equal(tensor, dict(_tensors(before))[name])]
    assert after.keys() == before.keys() and len(changed) == 1, changed


def _tensors(value, name=""):
    """(path, tensor) of every tensor inside nested dicts and lists."""
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else []
    return [pair for key, item in items for pair in _tensors(item, f"{name}/{key}")]


@pytest.mark.parametrize("damage", ["flip_weight_byte", "flip_state_tensor_byte", "truncate_state", "delete_manifest"])
def test_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(uninterrupted, tmp_path, damage):
    older, newest = _copy_run(uninterrupted, tmp_path / "run")
    if damage == "flip_weight_byte":
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "model.safetensors").write_bytes(bytes(data))
    elif damage == "flip_state_tensor_byte":
        _flip_a_byte_inside_a_tensor(newest / "state.pt")
        with pytest.raises(checkpoint.CorruptCheckpointError, match="state.pt does not match its checksum"):
            checkpoint.verify_checkpoint(newest)
    elif damage == "truncate_state":
        size = (newest / "state.pt").stat().st_size
        os.truncate(newest / "state.pt", size // 2)
    else:
        (newest / "manifest.json").unlink()
    messages = []
    found = checkpoint.find_resume_checkpoint("latest", tmp_path / "run", log=messages.append)
    assert found.path == older and found.step == 8
    assert len(messages) == 1 and newest.name in messages[0] and "corrupt" in messages[0]


def test_resume_from_a_corrupt_checkpoint_trains_on_from_the_previous_one(uninterrupted, tmp_path, capsys):
    older, newest = _copy_run(uninterrupted, tmp_path / "run")
    os.truncate(newest / "model.safetensors", 100)
    assert main(tiny_run_args(tmp_path / "run", "--resume", "latest", "--max-steps", "9")) == 0
    output = capsys.readouterr().out
    assert "corrupt" in output and f"resumed from {older}" in output
    assert logged_losses(tmp_path / "run")[9] == logged_losses(uninterrupted)[9]


def test_resume_from_an_explicit_corrupt_path_falls_back_to_its_older_sibling(uninterrupted, tmp_path):
    older, newest = _copy_run(uninterrupted, tmp_path / "run")
    (newest / "state.pt").write_bytes(b"junk")
    messages = []
    assert checkpoint.find_resume_checkpoint(str(newest), "ignored", log=messages.append).path == older
    assert messages and "corrupt" in messages[0]
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        checkpoint.find_resume_checkpoint(str(tmp_path / "nothing"), "ignored")


def test_every_checkpoint_corrupt_is_an_error_naming_them(uninterrupted, tmp_path):
    for path in _copy_run(uninterrupted, tmp_path / "run"):
        (path / "state.pt").write_bytes(b"junk")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="no loadable checkpoint"):
        checkpoint.find_resume_checkpoint("latest", tmp_path / "run", log=lambda message: None)


def test_half_written_staging_folders_are_ignored_and_state_loads_weights_only(uninterrupted, tmp_path):
    older, newest = _copy_run(uninterrupted, tmp_path / "run")
    staging = newest.parent / ".step_00000016.crashed"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.list_checkpoints(tmp_path / "run")[-1] == newest
    state = torch.load(newest / "state.pt", weights_only=True)  # no pickled code needed
    assert state["train"]["step"] == 12 and state["world_size"] == 1
    assert isinstance(state["rng"][0]["torch_cpu"], torch.Tensor)


def test_rng_state_round_trips_through_plain_types():
    import random

    import numpy as np

    snapshot = checkpoint.capture_rng_state(torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    checkpoint.restore_rng_state(snapshot, torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


def test_checkpoint_files_are_fsynced_before_the_rename_and_the_folder_after(tmp_path):
    """A power cut can lose what was never fsync'ed even after the rename; a SIGKILL cannot show that,
    so the system calls are watched: the step folder and each of its files are synced before it is
    renamed into place, and checkpoints/ after; pruning and setting aside sync the folder too."""
    model = tiny_clip()
    with SyscallSpy() as spy:
        paths = [checkpoint.save_checkpoint(tmp_path, step, model, tiny_state(step), model_name="tiny",
                                            run_id="run", keep_last=1) for step in (1, 2)]
    spy.assert_durable_renames(paths)
    assert sorted((paths[1]).iterdir()) == sorted(paths[1] / name for name in
                                                  ("manifest.json", "model.safetensors", "state.pt"))
    pruned = [(index, source) for index, source, _ in spy.renames() if source == paths[0].resolve()]
    assert len(pruned) == 1 and spy.synced(paths[0].parent, after=pruned[0][0]), spy.events
    with SyscallSpy() as spy:
        aside = checkpoint.set_aside_corrupt(paths[1])
    [(index, _, destination)] = spy.renames()
    assert destination == aside.resolve() and spy.synced(aside.parent, after=index), spy.events
