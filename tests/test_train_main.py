"""The default job end to end at a reduced size: generate the embedded set, train RN-Tiny at 32 px on CPU,
print the zero-shot table, write results.json; then ``fastclip eval`` on the checkpoint agrees with it.

Stated accuracy at this size (4,800 training images, 2 epochs = 150 steps of 64, ~35 s): on held-out
seen combinations zero-shot top-1 >= 0.12 (8x chance, 1/64; measured 0.19-0.21) and top-5 >= 0.5
(measured ~0.8), colour alone >= 0.95; unseen combinations >= 3x chance. At this budget the model
has learnt colour and only begins on shape (shape learning takes off after ~25k samples); the full
default (`fastclip train`, 375 steps of 128, ~3 min) reaches 0.93 on seen combinations (README).
"""
import json
import subprocess
import sys

import pytest

from fastclip.data import shapes
from fastclip.eval.main import main as eval_main
from fastclip.train.main import main as train_main

CHANCE = 1 / 64


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("default")
    argv = ["--embedded-train-size", "4800", "--embedded-val-size", "256", "--batch-size", "64", "--epochs", "2",
            "--warmup", "10", "--cache-dir", str(root / "cache"), "--output-dir", str(root / "run"), "--no-progress"]
    return root, argv


@pytest.fixture(scope="module")
def trained(default_run):
    import contextlib
    import io

    root, argv = default_run
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train_main(argv) == 0
    return root, printed.getvalue(), json.loads((root / "run" / "results.json").read_text())


def test_results_json_has_the_promised_keys_and_fractions(trained):
    _, _, results = trained
    assert results["steps"] == 2 * (4800 // 64) and results["samples_seen"] == results["steps"] * 64
    # the rate is the samples trained over the seconds spent in training steps, and those fit in the wall time
    assert 0 < results["train_seconds"] < results["wall_seconds"]
    assert results["samples_per_second"] == pytest.approx(results["samples_seen"] / results["train_seconds"], rel=1e-9)
    for key in ("zeroshot_top1", "zeroshot_top5"):
        assert 0.0 <= results[key] <= 1.0
    assert results["zeroshot_top5"] >= results["zeroshot_top1"]
    # the headline numbers are the seen split's prompt-ensemble zero-shot accuracies, 1/256 apart at most
    assert results["zeroshot_top1"] == results["evaluation"]["val_seen/ensemble_top1"]
    assert results["zeroshot_top5"] == results["evaluation"]["val_seen/ensemble_top5"]
    assert results["model"] == "RN-Tiny" and results["nonfinite_steps"] == 0


def test_reaches_the_stated_accuracy(trained):
    _, _, results = trained
    evaluation = results["evaluation"]
    assert results["zeroshot_top1"] >= 0.12, evaluation
    assert results["zeroshot_top5"] >= 0.5, evaluation
    assert evaluation["val_unseen/ensemble_top1"] >= 3 * CHANCE, evaluation
    assert evaluation["val_seen/colour_top1"] >= 0.95, evaluation
    assert evaluation["val_seen/image_to_text_R@10"] > 10 / 256, evaluation


def test_prints_the_table_and_writes_metrics_and_a_checkpoint(trained):
    root, printed, results = trained
    for words in ("chance: top-1 1.6%", "seen combinations", "unseen combinations", "shifted (textured bg)",
                  "image -> text", "text -> image", "R@10"):
        assert words in printed
    lines = (root / "run" / "metrics.jsonl").read_text().splitlines()
    train_lines = [json.loads(line) for line in lines if json.loads(line)["kind"] == "train"]
    assert [record["step"] for record in train_lines] == list(range(1, results["steps"] + 1))
    assert (root / "run" / "checkpoints" / f"step_{results['steps']:08d}" / "model.safetensors").is_file()


def _dataset_root(root):
    return next(path for path in (root / "cache").iterdir() if path.name.startswith("shapes-"))


def test_eval_cli_reproduces_the_trainer_zero_shot_numbers_and_runs_every_task(trained, tmp_path):
    root, _, results = trained
    checkpoint = root / "run" / "checkpoints" / f"step_{results['steps']:08d}"
    data = _dataset_root(root)
    (tmp_path / "classes.txt").write_text("\n".join(shapes.class_names()) + "\n")
    zeroshot = tmp_path / "zeroshot.json"
    assert eval_main(["--task", "zeroshot", "--checkpoint", str(checkpoint), "--data", str(data / "val_seen.csv"),
                      "--classnames", str(tmp_path / "classes.txt"), "--templates", "shapes",
                      "--workers", "0", "--output", str(zeroshot)]) == 0
    assert json.loads(zeroshot.read_text())["top1"] == pytest.approx(results["zeroshot_top1"], abs=1e-6)

    retrieval = tmp_path / "retrieval.json"
    assert eval_main(["--task", "retrieval", "--checkpoint", str(checkpoint), "--data", str(data / "val_seen.csv"),
                      "--workers", "0", "--output", str(retrieval)]) == 0
    recalls = json.loads(retrieval.read_text())
    assert recalls["image_to_text_R@1"] <= recalls["image_to_text_R@5"] <= recalls["image_to_text_R@10"]

    probe = tmp_path / "probe.json"
    assert eval_main(["--task", "linear-probe", "--checkpoint", str(checkpoint), "--data",
                      str(data / "val_seen.csv"), "--train-data", str(data / "val_shifted.csv"), "--workers", "0",
                      "--output", str(probe)]) == 0
    assert json.loads(probe.read_text())["top1"] > 5 * CHANCE


def test_eval_without_data_uses_the_cached_embedded_set_and_prints_the_same_table(trained, tmp_path, capsys):
    root, printed, results = trained
    checkpoint = root / "run" / "checkpoints" / f"step_{results['steps']:08d}"
    capsys.readouterr()
    assert eval_main(["--task", "zeroshot", "--checkpoint", str(checkpoint), "--cache-dir", str(root / "cache"),
                      "--workers", "0", "--output", str(tmp_path / "table.json")]) == 0
    table = capsys.readouterr().out
    assert table.strip() in printed  # the trainer printed exactly this table
    evaluation = json.loads((tmp_path / "table.json").read_text())
    assert evaluation == pytest.approx(results["evaluation"], abs=1e-6)


def test_training_on_a_user_csv_reports_validation_retrieval(trained, tmp_path, capsys):
    root, _, _ = trained
    data = _dataset_root(root)
    argv = ["--train-data", str(data / "train.csv"), "--val-data", str(data / "val_seen.csv"), "--model", "RN-Tiny",
            "--force-image-size", "32", "--batch-size", "16", "--max-steps", "3", "--workers", "1",
            "--output-dir", str(tmp_path), "--no-progress"]
    assert train_main(argv) == 0
    evaluation = json.loads((tmp_path / "results.json").read_text())["evaluation"]
    assert set(evaluation) == {f"val/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert "validation retrieval" in capsys.readouterr().out


def test_module_entry_point_and_cli_router_show_the_flags():
    for command in ([sys.executable, "-m", "fastclip.train", "--help"], [sys.executable, "-m", "fastclip", "train",
                                                                          "--help"]):
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stderr
        for flag in ("--train-data", "--precision", "--accum-freq", "--resume", "--local-loss", "--profile",
                     "--keep-last", "--max-nonfinite-steps", "--grad-clip-norm", "--report-to"):
            assert flag in completed.stdout


def test_bad_flags_are_reported_with_the_fix(capsys, tmp_path):
    assert train_main(["--batch-size", "10", "--accum-freq", "3"]) == 2
    assert "not divisible by --accum-freq" in capsys.readouterr().err
    assert train_main(["--dataset-type", "webdataset", "--train-data", "x.tar"]) == 2
    assert "--train-num-samples" in capsys.readouterr().err
    assert train_main(["--dataset-type", "synthetic", "--model", "no-such-model", "--output-dir", str(tmp_path)]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert train_main(["--dataset-type", "synthetic", "--siglip", "--force-image-size", "32", "--output-dir",
                       str(tmp_path)]) == 2
    assert "logit_bias" in capsys.readouterr().err
