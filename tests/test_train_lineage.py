"""Nothing a user saved is lost: lineages, keep-last, which checkpoint ``--resume`` picks, what is refused.

Issue 11, defects 1, 4 and 5 and the output-folder checks. The policy tests use a tiny CLIP (checkpoints
of a few hundred kB); the end-to-end ones train fastclip-tiny for a few steps.
"""
import json
import os
import shutil

import pytest

from fastclip.eval.main import main as eval_main
from fastclip.train import checkpoint
from fastclip.train.args import parse_args
from fastclip.train.main import main
from fastclip.train.metrics import MetricsLogger
from fastclip.train.run_dir import check_output_dir, prepare_output
from tests.train_utils import logged_losses, synthetic_run_args, tiny_clip, tiny_state

# ----------------------------------------------------------------------------- policy, tiny checkpoints


@pytest.fixture(scope="module")
def model():
    return tiny_clip()


def _save(output_dir, step, model, run_id, keep_last=0):
    return checkpoint.save_checkpoint(output_dir, step, model, tiny_state(step), model_name="fastclip-tiny",
                                      run_id=run_id, keep_last=keep_last)


def _names(output_dir):
    return [path.name for path in checkpoint.list_checkpoints(output_dir)]


def _plan(output_dir, *extra):
    return prepare_output(parse_args(synthetic_run_args(output_dir, *extra)))


def test_keep_last_prunes_only_the_lineage_it_writes_and_never_the_newest(tmp_path, model):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, "run-a", keep_last=2)
    assert _names(tmp_path) == ["step_00000003", "step_00000004"]
    unreadable = tmp_path / "checkpoints" / "step_00000005"
    unreadable.mkdir()  # a folder whose manifest cannot be read is never deleted
    for step in (6, 7, 8):
        _save(tmp_path, step, model, "run-b", keep_last=1)
    assert _names(tmp_path) == ["step_00000003", "step_00000004", "step_00000005", "step_00000008"]
    assert not [entry for entry in (tmp_path / "checkpoints").iterdir() if entry.name.startswith(".")]


def test_save_never_overwrites_an_existing_step(tmp_path, model):
    first = _save(tmp_path, 3, model, "run-a")
    before = (first / "manifest.json").read_text()
    with pytest.raises(checkpoint.CheckpointExistsError, match="never overwrites"):
        _save(tmp_path, 3, model, "run-b")
    assert (first / "manifest.json").read_text() == before


def _damage_manifest(path, damage):
    manifest = json.loads((path / "manifest.json").read_text())
    text = {"empty_object": "{}", "null": "null", "list": "[1, 2]", "truncated": json.dumps(manifest)[:40],
            "no_sha256": json.dumps({**manifest, "sha256": None}),
            "one_sha256": json.dumps({**manifest, "sha256": {"state.pt": manifest["sha256"]["state.pt"]}}),
            "step_as_text": json.dumps({**manifest, "step": str(manifest["step"])}),
            "other_step": json.dumps({**manifest, "step": manifest["step"] + 1})}[damage]
    (path / "manifest.json").write_text(text)


@pytest.mark.parametrize("damage", ["empty_object", "null", "list", "truncated", "no_sha256", "one_sha256",
                                    "step_as_text", "other_step"])
def test_a_structurally_bad_manifest_is_corrupt_and_latest_falls_back_to_the_previous(tmp_path, model, damage):
    _save(tmp_path, 1, model, "run-a")
    newest = _save(tmp_path, 2, model, "run-a")
    _damage_manifest(newest, damage)
    with pytest.raises(checkpoint.CorruptCheckpointError):
        checkpoint.load_training_checkpoint(newest)
    plan, loaded = _plan(tmp_path, "--resume", "latest")
    assert loaded.step == 1 and plan.run_id == "run-a"  # the lineage goes on from its previous checkpoint
    assert any("corrupt" in note and "step_00000002" in note for note in plan.notes)
    kept = tmp_path / "checkpoints" / "step_00000002.corrupt"
    assert kept.is_dir() and (kept / "model.safetensors").is_file()  # set aside, not deleted


def test_a_state_file_that_is_not_a_training_state_is_corrupt(tmp_path, model):
    path = checkpoint.save_checkpoint(tmp_path, 1, model, {"something": 1}, model_name="x", run_id="r")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="not a fastclip training state"):
        checkpoint.load_training_checkpoint(path)


def test_a_fresh_run_refuses_an_output_dir_holding_an_earlier_run(tmp_path, model):
    _save(tmp_path / "with-checkpoints", 4, model, "run-a")
    (tmp_path / "with-metrics").mkdir()
    (tmp_path / "with-metrics" / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    for folder, named in (("with-checkpoints", "step_00000004"), ("with-metrics", "metrics.jsonl")):
        with pytest.raises(ValueError, match="--resume latest") as error:
            _plan(tmp_path / folder)
        assert named in str(error.value) and "new --output-dir" in str(error.value)
    assert _names(tmp_path / "with-checkpoints") == ["step_00000004"]


def test_resume_latest_takes_the_newest_of_the_lineage_and_refuses_a_mixed_folder(tmp_path, model):
    for step in (2, 4):
        _save(tmp_path, step, model, "run-a")
    plan, loaded = _plan(tmp_path, "--resume", "latest")
    assert loaded.step == 4 and plan.run_id == "run-a" and plan.parent["step"] == 4
    _save(tmp_path, 6, model, "run-b")
    with pytest.raises(ValueError, match="ambiguous"):
        _plan(tmp_path, "--resume", "latest")


def test_resuming_an_older_checkpoint_in_place_is_refused_and_branching_elsewhere_is_recorded(tmp_path, model):
    for step in (1, 4):
        _save(tmp_path / "run", step, model, "run-a")
    older = tmp_path / "run" / "checkpoints" / "step_00000001"
    with pytest.raises(ValueError, match="step_00000004") as error:
        _plan(tmp_path / "run", "--resume", str(older))
    assert "new --output-dir" in str(error.value)
    plan, loaded = _plan(tmp_path / "branch", "--resume", str(older))
    assert loaded.step == 1 and plan.run_id != "run-a"
    assert plan.parent == {"run_id": "run-a", "step": 1, "path": str(older.resolve())}
    _save(tmp_path / "other", 9, model, "run-c")
    with pytest.raises(ValueError, match="branch"):
        _plan(tmp_path / "other", "--resume", str(older))


def test_resume_latest_without_output_dir_uses_the_newest_run_under_runs(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="pass --output-dir"):
        _plan(None, "--resume", "latest")
    _save(tmp_path / "runs" / "older", 2, model, "run-a")
    newest = _save(tmp_path / "runs" / "newer", 3, model, "run-b")
    os.utime(tmp_path / "runs" / "older" / "checkpoints" / "step_00000002", (1, 1))
    plan, loaded = _plan(None, "--resume", "latest")
    assert loaded.path.resolve() == newest.resolve() and plan.output_dir == os.path.join("runs", "newer")


def test_stale_staging_folders_are_removed_at_start_and_nothing_else(tmp_path, model):
    _save(tmp_path, 2, model, "run-a")
    root = tmp_path / "checkpoints"
    (root / ".step_00000004.ab12cd34").mkdir()  # what a SIGKILL during a save leaves
    (root / ".step_00000002.old.ab12cd34").mkdir()
    (root / ".keepme").write_text("a user's file")
    plan, _ = _plan(tmp_path, "--resume", "latest")
    assert sorted(entry.name for entry in root.iterdir()) == [".keepme", "step_00000002"]
    assert any("half-written" in note for note in plan.notes)


def test_unusable_output_dirs_are_refused_before_training(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    for folder, match in ((tmp_path / "a-file", "is a file"), (tmp_path / "a-file" / "below", "cannot write"),
                          (tmp_path / "run", "checkpoints is a file")):
        with pytest.raises(ValueError, match=match):
            check_output_dir(folder, saves_checkpoints=True)
    check_output_dir(tmp_path / "run", saves_checkpoints=False)  # no checkpoints: the file is not in the way


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_refused(tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        with pytest.raises(ValueError, match="cannot write"):
            check_output_dir(tmp_path / "ro", saves_checkpoints=True)
    finally:
        os.chmod(tmp_path / "ro", 0o755)


def test_a_read_only_file_system_is_refused_with_its_reason(tmp_path, monkeypatch):
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)  # what a read-only mount answers, even to root
    with pytest.raises(ValueError, match="cannot write in .*Read-only file system"):
        check_output_dir(tmp_path, saves_checkpoints=True)


def test_metrics_of_redone_steps_and_torn_lines_are_moved_aside_not_cut(tmp_path):
    lines = [json.dumps({"kind": "train", "step": step, "loss": step / 10}) for step in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "tr')
    said = []
    MetricsLogger(tmp_path, is_main=True, initial_step=3, progress=False, say=said.append).close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:3]
    assert (tmp_path / "metrics.superseded.jsonl").read_text().splitlines() == lines[3:] + ['{"kind": "tr']
    assert said and "3 line(s)" in said[0] and "metrics.superseded.jsonl" in said[0]
    MetricsLogger(tmp_path, is_main=True, initial_step=1, progress=False, say=said.append).close()
    superseded = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert superseded == lines[3:] + ['{"kind": "tr'] + lines[1:3]  # appended: earlier copies stay


# ------------------------------------------------------------------------------- end to end, real runs


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 6-step run: checkpoints of steps 4 and 6 (keep-last 2)."""
    output_dir = tmp_path_factory.mktemp("base") / "run"
    assert main(synthetic_run_args(output_dir)) == 0
    assert _names(output_dir) == ["step_00000004", "step_00000006"]
    return output_dir


def _snapshot(folder):
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*")}


def test_cli_refuses_to_overwrite_and_to_resume_an_older_checkpoint_in_place(base_run, capsys):
    before = _snapshot(base_run)
    assert main(synthetic_run_args(base_run)) == 2
    assert "--resume latest" in capsys.readouterr().err
    assert main(synthetic_run_args(base_run, "--resume", str(base_run / "checkpoints" / "step_00000004"))) == 2
    assert "step_00000006" in capsys.readouterr().err
    assert _snapshot(base_run) == before  # nothing written, moved or deleted


def test_a_branch_trains_step_exactly_from_its_parent_and_leaves_it_untouched(base_run, tmp_path):
    before = _snapshot(base_run)
    parent = base_run / "checkpoints" / "step_00000004"
    assert main(synthetic_run_args(tmp_path, "--resume", str(parent))) == 0
    assert _snapshot(base_run) == before
    assert _names(tmp_path) == ["step_00000006"]
    manifest = checkpoint.read_manifest(tmp_path / "checkpoints" / "step_00000006")
    assert manifest["parent"]["path"] == str(parent.resolve()) and manifest["parent"]["step"] == 4
    assert manifest["run_id"] != checkpoint.read_manifest(parent)["run_id"]
    expected = logged_losses(base_run)
    assert logged_losses(tmp_path) == {5: expected[5], 6: expected[6]}


def test_resume_latest_goes_on_in_the_lineage_and_keeps_the_metrics_it_redoes(base_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    redone = json.dumps({"kind": "train", "step": 7, "loss": 123.0})  # a line from a run killed after step 7
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(redone + "\n")
    assert main(synthetic_run_args(run, "--resume", "latest", "--epochs", "2", "--max-steps", "8")) == 0
    assert "metrics.superseded.jsonl" in capsys.readouterr().out
    assert _names(run) == ["step_00000006", "step_00000008"]  # keep-last 2 within the lineage
    assert sorted(logged_losses(run)) == list(range(1, 9)) and logged_losses(run)[7] != 123.0
    assert (run / "metrics.superseded.jsonl").read_text().splitlines() == [redone]
    lineage = {checkpoint.read_manifest(path)["run_id"] for path in checkpoint.list_checkpoints(run)}
    assert len(lineage) == 1


def test_nothing_left_to_train_writes_strictly_valid_results(base_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    assert main(synthetic_run_args(run, "--resume", "latest")) == 0
    assert "no step left to train" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert results["steps"] == 6 and results["samples_per_second"] is None


def test_resuming_into_another_model_or_image_size_is_one_short_message(base_run, capsys):
    assert main(synthetic_run_args(base_run, "--resume", "latest", "--model", "ViT-Tiny-16")) == 2
    error = capsys.readouterr().err
    assert "--model fastclip-tiny" in error and "--model ViT-Tiny-16" in error and len(error) < 600
    assert main([*synthetic_run_args(base_run, "--resume", "latest"), "--force-image-size", "48"]) == 2
    error = capsys.readouterr().err
    assert "positional_embedding" in error and "--force-image-size" in error and len(error) < 600


def test_resuming_with_another_batch_size_warns_that_it_is_not_step_exact(base_run, tmp_path, capsys):
    parent = base_run / "checkpoints" / "step_00000004"  # 32 of the epoch's 48 samples consumed
    assert main([*synthetic_run_args(tmp_path, "--resume", str(parent)), "--batch-size", "16"]) == 0
    output = capsys.readouterr().out
    assert "NOT STEP-EXACT" in output and "--batch-size 8" in output and "from sample 32" in output
    assert sorted(logged_losses(tmp_path)) == [5]  # samples 32..47: one batch of 16 finishes the epoch


def test_eval_on_a_corrupt_checkpoint_exits_2_with_the_file(base_run, tmp_path, capsys):
    damaged = tmp_path / "step_00000006"
    shutil.copytree(base_run / "checkpoints" / "step_00000006", damaged)
    (damaged / "manifest.json").write_text("{}")
    assert eval_main(["--task", "retrieval", "--checkpoint", str(damaged), "--workers", "0"]) == 2
    assert str(damaged) in capsys.readouterr().err
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes((base_run / "checkpoints" / "step_00000006" / "model.safetensors").read_bytes()[:5000])
    assert eval_main(["--task", "retrieval", "--checkpoint", str(weights), "--workers", "0"]) == 2
    assert "damaged or truncated" in capsys.readouterr().err


def test_a_full_disk_during_a_save_exits_2_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, capsys):
    import errno

    import fastclip.train.loop as loop

    save_checkpoint = loop.save_checkpoint

    def full_disk_at_step_4(output_dir, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output_dir))
        return save_checkpoint(output_dir, step, *args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", full_disk_at_step_4)
    assert main(synthetic_run_args(tmp_path, "--max-steps", "4")) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert _names(tmp_path) == ["step_00000002"]
    checkpoint.load_training_checkpoint(tmp_path / "checkpoints" / "step_00000002")


@pytest.mark.parametrize("flag", ["--keep-last", "--save-every-n-steps", "--save-frequency", "--workers"])
def test_negative_counts_are_rejected(flag, capsys):
    assert main(synthetic_run_args(None, flag, "-1")) == 2
    assert f"{flag} must be >= 0" in capsys.readouterr().err
