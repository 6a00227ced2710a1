"""Trainer flags open_clip users type: LiT locks, --force-patch-dropout, --dataset-type auto, --torchcompile,
--imagenet-val zero-shot during training, and the console output of a piped run."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import fastclip
from fastclip.train import checkpoint
from fastclip.train.main import main
from tests.test_eval_image_folder import FOLDERS, NAMES, write_image_folder


def tiny_run(output_dir, *extra, steps=3):
    """fastclip-tiny at 32 px on the synthetic set, ``steps`` fp32 CPU steps, a checkpoint at the end."""
    return ["--dataset-type", "synthetic", "--train-num-samples", str(8 * steps), "--batch-size", "8", "--epochs", "1",
            "--force-image-size", "32", "--workers", "0", "--lr", "1e-2", "--warmup", "1", "--seed", "2",
            "--no-progress", "--output-dir", str(output_dir), *extra]


def _final_checkpoint(output_dir):
    path = checkpoint.list_checkpoints(output_dir)[-1]
    return load_file(str(path / checkpoint.MODEL_FILE)), torch.load(path / checkpoint.STATE_FILE, weights_only=False)


# ------------------------------------------------------------------------------------ LiT locks


def test_lock_flags_keep_frozen_weights_and_no_optimizer_state(tmp_path):
    torch.manual_seed(0)
    start = fastclip.create_model("fastclip-tiny", image_size=32)
    weights = fastclip.model.save_model(start, tmp_path / "start.safetensors")
    code = main(tiny_run(tmp_path / "run", "--pretrained", str(weights), "--lock-image",
                         "--lock-image-unlocked-groups", "1", "--lock-text", "--lock-text-unlocked-layers", "2",
                         "--lock-text-freeze-layer-norm"))
    assert code == 0
    expected = fastclip.create_model("fastclip-tiny", image_size=32)
    expected.lock_image_tower(unlocked_groups=1)
    expected.lock_text_tower(unlocked_layers=2, freeze_layer_norm=True)
    frozen = [name for name, p in expected.named_parameters() if not p.requires_grad]
    trainable = [name for name, p in expected.named_parameters() if p.requires_grad]
    assert frozen and trainable
    trained, state = _final_checkpoint(tmp_path / "run")
    initial = start.state_dict()
    for name in frozen:
        assert torch.equal(trained[name], initial[name]), f"{name} is locked but changed"
    moved = [name for name in trainable if not torch.equal(trained[name], initial[name])]
    assert moved == trainable
    optimizer_state = state["optimizer"]["state"]
    held = sum(len(group["params"]) for group in state["optimizer"]["param_groups"])
    assert held == len(trainable) and len(optimizer_state) == len(trainable)


def test_lock_image_freeze_bn_stats_keeps_running_statistics(tmp_path):
    torch.manual_seed(0)
    start = fastclip.create_model("RN-Tiny", image_size=32)
    weights = fastclip.model.save_model(start, tmp_path / "start.safetensors")
    assert main(tiny_run(tmp_path / "run", "--model", "RN-Tiny", "--pretrained", str(weights), "--lock-image",
                         "--lock-image-freeze-bn-stats")) == 0
    trained, _ = _final_checkpoint(tmp_path / "run")
    statistics = [key for key in trained if key.startswith("visual.") and "running_" in key]
    assert statistics and all(torch.equal(trained[key], start.state_dict()[key]) for key in statistics)
    assert main(tiny_run(tmp_path / "free", "--model", "RN-Tiny", "--pretrained", str(weights), "--lock-image")) == 0
    trained, _ = _final_checkpoint(tmp_path / "free")  # without the flag BatchNorm keeps updating them
    assert any(not torch.equal(trained[key], start.state_dict()[key]) for key in statistics)


def test_partial_unlock_of_a_resnet_exits_2(tmp_path, capsys):
    assert main(tiny_run(tmp_path / "run", "--model", "RN-Tiny", "--lock-image", "--lock-image-unlocked-groups",
                         "1")) == 2
    assert "ViT image tower" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ data and model flags


@pytest.mark.parametrize("train_data, expected", [("shards-{0000..0003}.tar", "webdataset"), ("pairs.csv", "csv"),
                                                  ("pairs.tsv", "csv"), ("a.tar::b.tar", "webdataset")])
def test_dataset_type_auto_picks_as_open_clip(train_data, expected):
    from fastclip.train.args import parse_args

    extra = ["--train-num-samples", "10"] if expected == "webdataset" else []
    assert parse_args(["--train-data", train_data, "--dataset-type", "auto", *extra]).dataset_type == expected
    assert parse_args(["--train-data", train_data, *extra]).dataset_type == expected  # auto is the default


def test_dataset_type_auto_refuses_an_unknown_extension(capsys):
    assert main(["--train-data", "pairs.parquet"]) == 2
    assert "--dataset-type" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ output


def test_piped_train_prints_progress_lines_and_intermediate_zero_shot(tmp_path):
    """A run whose stdout is a pipe: plain progress lines, the folder zero-shot after each epoch and at the end."""
    root = write_image_folder(tmp_path / "val")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    command = [sys.executable, "-m", "fastclip", "train",
               *tiny_run(tmp_path / "run", "--epochs", "2", "--imagenet-val", str(root), "--classnames", str(names),
                         "--zeroshot-templates", "single", "--max-steps", "5"),
               "--progress-every-n-steps", "2"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/5", "4/5", "5/5"], completed.stdout
    assert "steps/epoch" in completed.stdout and "5 steps in all" in completed.stdout  # the header honours --max-steps
    zero_shot = [line for line in lines if line.startswith("zero-shot on")]
    assert len(zero_shot) == 2, completed.stdout  # after epoch 1 (steps 1-3) and at the end
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["evaluation"]["imagenet-val/top1"] <= results["evaluation"]["imagenet-val/top5"] <= 1
    assert results["evaluation"]["imagenet-val/images"] == 3 * len(FOLDERS)
    assert results["zeroshot_top1"] == results["evaluation"]["imagenet-val/top1"]
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "zeroshot"] == [3]


def test_force_patch_dropout_sets_the_models_patch_dropout(tmp_path):
    from fastclip.train.args import parse_args
    from fastclip.train.build import build_model
    from fastclip.train.process_group import init_distributed

    config = parse_args(tiny_run(tmp_path / "run", "--force-patch-dropout", "0.5", "--precision", "fp32"))
    assert config.patch_dropout == 0.5
    model = build_model(config, init_distributed("cpu", None, 60.0))
    assert model.visual.patch_dropout.prob == 0.5
    assert parse_args(tiny_run(tmp_path / "run")).patch_dropout == 0.0  # the config's (none) without the flag
    assert main(tiny_run(tmp_path / "bad", "--force-patch-dropout", "1.5")) == 2


def test_workers_default_to_the_cpus_this_process_may_use(monkeypatch):
    import os

    from fastclip.train.args import parse_args

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert parse_args(["--dataset-type", "synthetic"]).workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert parse_args(["--dataset-type", "synthetic"]).workers == 4  # open_clip's default, as a cap
    assert parse_args(["--dataset-type", "synthetic", "--workers", "7"]).workers == 7


def test_torchcompile_trains_like_eager(tmp_path):
    """One step with the model and the loss compiled (the loss with fullgraph=True: a graph break fails the run)
    logs the eager run's loss and makes the eager run's update; one step because compiling on CPU takes a minute.

    The update is compared per tensor as ||compiled - eager|| <= 1e-2 ||eager||: Adam's first step divides each
    gradient element by its own size, so rounding noise in gradients that are zero in exact arithmetic (the
    key-projection biases: softmax ignores a constant shift) becomes an lr-sized step in either direction."""
    from tests.train_utils import logged_losses

    torch.manual_seed(0)
    start = fastclip.create_model("fastclip-tiny", image_size=32)
    weights = fastclip.model.save_model(start, tmp_path / "start.safetensors")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(tiny_run(eager, "--pretrained", str(weights), steps=1)) == 0
    assert main(tiny_run(compiled, "--pretrained", str(weights), "--torchcompile", steps=1)) == 0
    assert logged_losses(compiled)[1] == pytest.approx(logged_losses(eager)[1], rel=1e-5)
    expected, _ = _final_checkpoint(eager)
    trained, _ = _final_checkpoint(compiled)
    assert trained.keys() == expected.keys()  # the bare model is saved: no "_orig_mod." prefix
    initial = start.state_dict()
    for key, value in expected.items():
        if value.is_floating_point():
            step_eager, step_compiled = value - initial[key], trained[key] - initial[key]
            assert (step_compiled - step_eager).norm() <= 1e-2 * step_eager.norm() + 1e-12, key
