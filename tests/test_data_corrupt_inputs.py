"""Corrupted, truncated and empty inputs of every kind the loaders take (CSV, webdataset shards, images,
weights): each one is a clear error naming the file, or is skipped and counted; none hangs or crashes
training mid-run. (Damaged checkpoints and manifests: tests/test_train_lineage.py.)"""
import functools
import io
import logging
import tarfile

import pytest
import torch

import fastclip
from fastclip.data.csv_dataset import CsvDataset
from fastclip.data.image_io import MAX_CONSECUTIVE_BAD_IMAGES, UnreadableDataError
from fastclip.data.loader import TrainBatches
from fastclip.data.webdataset_dataset import WebDatasetPairs
from fastclip.train.main import main
from tests.data_utils import write_pairs, write_shards

TOKENIZER = functools.partial(fastclip.tokenize, context_length=77, truncate=True)
TRANSFORM = fastclip.image_transform(32, train=False)


def _caption(tokens) -> str:
    return fastclip.tokenizer.decode(tokens, skip_special=True).strip()


# ----------------------------------------------------------------------------------------------- CSV


def test_rows_without_a_caption_or_image_path_are_skipped_counted_and_located(tmp_path):
    lines = write_pairs(tmp_path, 12).read_text().splitlines()
    lines[3] = lines[3].split("\t")[0]                 # line 4: no caption field at all (the issue's crash)
    lines[5] = lines[5].split("\t")[0] + "\t   "       # line 6: a blank caption
    lines[8] = "\t" + lines[8].split("\t")[1]          # line 9: no image path
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    dataset = CsvDataset(tmp_path / "pairs.csv", TRANSFORM, TOKENIZER)
    assert dataset.skipped_rows == [4, 6, 9] and len(dataset) == 9
    for index in range(len(dataset)):  # every kept caption still belongs to its image
        number = int(dataset.image_paths[index][-7:-4])
        assert torch.equal(dataset[index][1], TOKENIZER([f"caption number {number}"])[0])


def test_a_csv_cut_short_mid_row_loses_only_that_row(tmp_path):
    path = write_pairs(tmp_path, 9)
    text = path.read_text()
    path.write_text(text[: text.rindex("\t") - 2])  # the kill came in the last image path
    dataset = CsvDataset(path, TRANSFORM, TOKENIZER)
    assert dataset.skipped_rows == [10] and len(dataset) == 8


@pytest.mark.parametrize("content, match", [
    (b"", "has no rows"),
    (b"filepath\ttitle\n", "has no rows"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary junk \xff", "not UTF-8"),
    (b"filepath,title\na.png,hello\n", "no column"),               # comma-separated, read as tab-separated
    (b"filepath\ttitle\na.png\nb.png\t\n", "every row lacks"),
    (b"filepath\ttitle\n" + b"".join(b"gone%d.png\tcap\n" % i for i in range(40)), "none of the first 32"),
])
def test_a_csv_that_cannot_feed_training_is_refused_naming_the_file(tmp_path, content, match):
    (tmp_path / "bad.csv").write_bytes(content)
    with pytest.raises(ValueError, match=match) as error:
        CsvDataset(tmp_path / "bad.csv", TRANSFORM, TOKENIZER)
    assert "bad.csv" in str(error.value)


def test_a_long_run_of_unreadable_images_is_an_error_naming_an_image_and_the_csv(tmp_path):
    count = MAX_CONSECUTIVE_BAD_IMAGES + 3
    dataset = CsvDataset(write_pairs(tmp_path, count, {i: "garbage" for i in range(count)}), TRANSFORM, TOKENIZER)
    with pytest.raises(UnreadableDataError, match="could not be read") as error:
        dataset[5]
    assert "img005.png" in str(error.value) and "pairs.csv" in str(error.value)


def test_training_on_a_csv_with_a_captionless_row_counts_it_and_finishes(tmp_path):
    import json

    lines = write_pairs(tmp_path, 17, {2: "empty", 6: "truncated"}).read_text().splitlines()
    lines[4] = lines[4].split("\t")[0]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    argv = ["--train-data", str(tmp_path / "pairs.csv"), "--model", "RN-Tiny", "--force-image-size", "32",
            "--batch-size", "8", "--epochs", "1", "--workers", "0", "--no-progress", "--output-dir",
            str(tmp_path / "run")]
    assert main(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 2 and results["skipped_rows"] == 1 and results["skipped_images"] >= 1


def test_a_csv_whose_images_are_all_missing_exits_2_naming_the_csv(tmp_path, capsys):
    (tmp_path / "pairs.csv").write_text("filepath\ttitle\n" + "".join(f"x{i}.png\tcap {i}\n" for i in range(40)))
    assert main(["--train-data", str(tmp_path / "pairs.csv"), "--output-dir", str(tmp_path / "run"),
                 "--workers", "0", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "pairs.csv" in error and "x0.png" in error and "Traceback" not in error


# ---------------------------------------------------------------------------------------- webdataset


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _shard(tmp_path, kind):
    path = tmp_path / f"{kind}.tar"
    if kind == "empty_tar":
        return _tar(path, [])
    if kind == "captions_only":
        return _tar(path, [(f"s{i}.txt", b"a caption") for i in range(5)])
    if kind == "undecodable_images":
        return _tar(path, [(f"s{i}.{suffix}", data) for i in range(5)
                           for suffix, data in (("png", b"\x89PNG broken"), ("txt", b"a caption"))])
    path.write_bytes({"zero_bytes": b"", "not_a_tar": b"definitely not a tar archive" * 20}[kind])
    return str(path)


@pytest.mark.parametrize("kind", ["empty_tar", "captions_only", "undecodable_images", "zero_bytes", "not_a_tar"])
def test_shards_without_a_usable_sample_are_an_error_after_one_pass_not_a_hang(tmp_path, kind):
    url = _shard(tmp_path, kind)
    data = TrainBatches(WebDatasetPairs(url, TRANSFORM, TOKENIZER), batch_size=2, num_samples=4)
    with pytest.raises(UnreadableDataError, match="gave no usable sample") as error:
        next(data.epoch(0))
    assert url in str(error.value)


def test_a_truncated_shard_is_logged_and_the_good_ones_are_read(tmp_path, caplog):
    urls = write_shards(tmp_path, shards=2, per_shard=6)
    good = (tmp_path / "shard-01.tar").read_bytes()
    (tmp_path / "shard-01.tar").write_bytes(good[: len(good) // 2])  # cut in the middle of a member
    data = TrainBatches(WebDatasetPairs(urls, TRANSFORM, TOKENIZER, shuffle_buffer=4), batch_size=3, num_samples=9)
    with caplog.at_level(logging.WARNING, logger="fastclip.data"):
        batches = list(data.epoch(0))
    assert len(batches) == 3 and all(images.shape == (3, 3, 32, 32) for images, _, _ in batches)
    assert any("shard-01.tar" in record.getMessage() for record in caplog.records)


def test_fewer_pairs_than_the_shuffle_buffer_are_each_served_once_per_pass(tmp_path):
    url = write_shards(tmp_path, shards=1, per_shard=5)
    samples = WebDatasetPairs(url, TRANSFORM, TOKENIZER, shuffle_buffer=1000)
    stream = iter(samples)
    passes = [{_caption(next(stream)[1]) for _ in range(5)} for _ in range(2)]
    assert passes[0] == passes[1] == {f"pair 0 {item}" for item in range(5)}


def test_missing_shards_are_refused_up_front_with_their_names(tmp_path):
    write_shards(tmp_path, shards=2, per_shard=2)
    with pytest.raises(ValueError, match="1 of 3 shards do not exist") as error:
        WebDatasetPairs(str(tmp_path / "shard-{00..02}.tar"), TRANSFORM, TOKENIZER)
    assert "shard-02.tar" in str(error.value)


def test_training_on_an_empty_shard_exits_2_with_the_reason_from_a_worker(tmp_path, capsys):
    url = _shard(tmp_path, "empty_tar")
    assert main(["--train-data", url, "--train-num-samples", "16", "--model", "RN-Tiny", "--force-image-size",
                 "32", "--batch-size", "8", "--workers", "1", "--no-progress", "--output-dir",
                 str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "gave no usable sample" in error and url in error and "Original Traceback" not in error


# ------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "missing"])
def test_damaged_pretrained_weights_exit_2_naming_the_file(tmp_path, capsys, damage):
    weights = tmp_path / "weights.safetensors"
    if damage != "missing":
        fastclip.model.save_model(fastclip.create_model("RN-Tiny", image_size=32), weights)
        data = weights.read_bytes()
        weights.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x00junk" * 99}[damage])
    assert main(["--dataset-type", "synthetic", "--train-num-samples", "16", "--model", "RN-Tiny",
                 "--force-image-size", "32", "--batch-size", "8", "--workers", "0", "--no-progress",
                 "--pretrained", str(weights), "--output-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert str(weights) in error and "Traceback" not in error
