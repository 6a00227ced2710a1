"""The embedded procedural set: splits, held-out combinations, caching, labels that match the pixels."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

from fastclip.data import shapes


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    config = shapes.ShapesConfig(train_size=112, val_seen_size=56, val_unseen_size=24, val_shifted_size=24, seed=3)
    root = shapes.ensure_shapes_dataset(config, tmp_path_factory.mktemp("cache"), log=lambda message: None)
    return config, root


def _rows(root, split):
    with open(root / f"{split}.csv", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_splits_have_the_promised_sizes_columns_and_real_png_files(small_set):
    config, root = small_set
    for split, size in config.split_sizes().items():
        rows = _rows(root, split)
        assert len(rows) == size
        assert set(rows[0]) == set(shapes.CSV_FIELDS)
        image = Image.open(root / rows[0]["filepath"])
        assert image.format == "PNG" and image.size == (config.image_size, config.image_size)


def test_unseen_combinations_are_exactly_the_held_out_ones_and_never_in_training(small_set):
    _, root = small_set
    held_out = shapes.held_out_combinations()
    assert len(held_out) == len(shapes.SHAPES)
    assert len({colour for colour, _ in held_out}) == len(shapes.COLOURS)  # one per colour and per shape
    train_combos = {(row["colour"], row["shape"]) for row in _rows(root, "train")}
    unseen_combos = {(row["colour"], row["shape"]) for row in _rows(root, "val_unseen")}
    assert not train_combos & held_out
    assert unseen_combos == held_out
    assert train_combos == {(c, s) for c in shapes.COLOURS for s in shapes.SHAPES} - held_out


def test_shifted_split_uses_only_backgrounds_unseen_in_training(small_set):
    _, root = small_set
    assert {row["background"] for row in _rows(root, "train")} <= set(shapes.PLAIN_BACKGROUNDS)
    assert {row["background"] for row in _rows(root, "val_shifted")} <= set(shapes.SHIFTED_BACKGROUNDS)


def test_labels_and_captions_describe_the_pixels(small_set):
    _, root = small_set
    names = shapes.class_names()
    for row in _rows(root, "val_seen"):
        assert names[int(row["label"])] == f"{row['colour']} {row['shape']}"
        assert row["shape"] in row["title"] and row["colour"] in row["title"]
        pixels = np.asarray(Image.open(root / row["filepath"]).convert("RGB"), dtype=np.float64)
        background = np.array(shapes.PLAIN_BACKGROUNDS[row["background"]], dtype=np.float64)
        target = np.array(shapes.COLOURS[row["colour"]], dtype=np.float64)
        # the pixels far from the background are the shape's; their mean colour is the named one
        foreground = pixels[np.abs(pixels - background).sum(-1) > 120]
        assert len(foreground) > 20
        distances = {name: np.abs(foreground.mean(0) - rgb).sum() for name, rgb in shapes.COLOURS.items()}
        assert min(distances, key=distances.get) == row["colour"]
        shape_fraction = len(foreground) / (pixels.shape[0] * pixels.shape[1])
        assert 0.005 < shape_fraction < 0.6


def test_second_call_reuses_the_cache_and_a_crashed_generation_leaves_nothing(small_set, tmp_path, monkeypatch):
    config, root = small_set
    stamp = os.stat(root / "train.csv").st_mtime_ns
    assert shapes.ensure_shapes_dataset(config, root.parent, log=lambda message: None) == root
    assert os.stat(root / "train.csv").st_mtime_ns == stamp

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "_write_split", crash)
    with pytest.raises(KeyboardInterrupt):
        shapes.ensure_shapes_dataset(config, tmp_path, log=lambda message: None)
    assert [path.name for path in tmp_path.iterdir() if not path.name.endswith(".lock")] == []


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTCLIP_CACHE", str(tmp_path / "here"))
    assert shapes.default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("FASTCLIP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert shapes.default_cache_dir() == tmp_path / "xdg" / "fastclip"


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_every_shape_mask_is_distinct_and_inside_the_image(shape):
    mask = np.asarray(shapes.draw_shape_mask(shape, 64, 32.0, 32.0, 16.0, 0.0), dtype=np.float64) / 255
    assert 0.03 < mask.mean() < 0.25
    assert mask[0].max() == 0 and mask[-1].max() == 0
    others = [np.asarray(shapes.draw_shape_mask(other, 64, 32.0, 32.0, 16.0, 0.0), np.float64) / 255
              for other in shapes.SHAPES if other != shape]
    assert min(np.abs(mask - other).mean() for other in others) > 0.01
