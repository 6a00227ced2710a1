"""The trainer's settings as data: ``TrainConfig`` from Python trains exactly as the same flags do."""
import dataclasses
import json

import pytest

from fastclip.train import TrainConfig, train
from fastclip.train.args import parse_args
from fastclip.train.config import EMBEDDED_PRESET, GENERIC_DEFAULTS
from fastclip.train.main import main
from tests.train_utils import logged_losses

FLAGS = ["--dataset-type", "synthetic", "--train-num-samples", "32", "--batch-size", "8", "--epochs", "1",
         "--force-image-size", "32", "--workers", "0", "--patch-dropout", "0.25", "--lr", "1e-3", "--warmup", "2",
         "--seed", "5", "--no-progress", "--save-frequency", "0"]


def test_a_config_built_in_python_trains_exactly_like_the_same_flags(tmp_path):
    assert main([*FLAGS, "--output-dir", str(tmp_path / "cli")]) == 0
    config = TrainConfig(dataset_type="synthetic", train_num_samples=32, batch_size=8, epochs=1, force_image_size=32,
                         workers=0, patch_dropout=0.25, lr=1e-3, warmup=2, seed=5, no_progress=True,
                         save_frequency=0, output_dir=str(tmp_path / "python"))
    assert config == parse_args([*FLAGS, "--output-dir", str(tmp_path / "python")])
    results = train(config)
    from_cli = logged_losses(tmp_path / "cli")
    assert len(from_cli) == 4 and logged_losses(tmp_path / "python") == from_cli
    assert results["steps"] == 4
    assert json.loads((tmp_path / "python" / "results.json").read_text())["steps"] == 4


def test_presets_fill_only_what_was_not_given():
    embedded = TrainConfig()
    assert embedded.embedded and embedded == parse_args([])
    assert {name: getattr(embedded, name) for name in EMBEDDED_PRESET} == EMBEDDED_PRESET
    own_data = TrainConfig(train_data="pairs.csv", batch_size=32)
    assert not own_data.embedded and own_data.dataset_type == "csv"
    assert own_data.batch_size == 32 and own_data.model == GENERIC_DEFAULTS["model"]
    assert TrainConfig(train_data="shards-{0..3}.tar", train_num_samples=100).dataset_type == "webdataset"
    assert TrainConfig(dataset_type="synthetic").train_num_samples == 10000


def test_a_config_is_immutable_and_replace_checks_again():
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    assert config.replace(lr=1.0).lr == 1.0 and config.lr == EMBEDDED_PRESET["lr"]
    with pytest.raises(ValueError, match="--batch-size 10 is not divisible by --accum-freq 3"):
        config.replace(batch_size=10, accum_freq=3)


@pytest.mark.parametrize("changes, message", [
    ({"precision": "fp8"}, "--precision 'fp8' is not one of"),
    ({"epochs": 0}, "--epochs must be >= 1"),
    ({"workers": -1}, "--workers must be >= 0"),
    ({"dataset_type": "webdataset", "train_data": "a.tar"}, "needs --train-num-samples"),
])
def test_bad_values_name_the_flag_to_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)
