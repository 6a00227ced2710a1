"""CSV / webdataset / synthetic datasets, corrupt-image skipping, per-rank sharding and resumable order."""
import functools

import pytest
import torch

import fastclip
from fastclip.data.collate import collate_pairs, trim_padding
from fastclip.data.csv_dataset import CsvDataset
from fastclip.data.loader import ShardedEpochSampler, TrainBatches
from fastclip.data.synthetic import SyntheticShapesDataset
from tests.data_utils import write_pairs, write_shards

TOKENIZER = functools.partial(fastclip.tokenize, context_length=77, truncate=True)


def _transform(size=32):
    return fastclip.image_transform(size, train=False)


def test_csv_dataset_replaces_corrupt_images_and_counts_them(tmp_path):
    corrupt = {3: "garbage", 4: "truncated", 9: "empty", 11: "missing"}
    dataset = CsvDataset(write_pairs(tmp_path, 23, corrupt), _transform(), TOKENIZER)
    failed_reads = []
    original_load = dataset._load
    dataset._load = lambda i: failed_reads.append(i) if (image := original_load(i)) is None else image
    skipped_total, captions = 0, []
    for index in range(len(dataset)):
        image, tokens, skipped = dataset[index]
        assert image.shape == (3, 32, 32) and torch.isfinite(image).all()
        assert (skipped > 0) == (index in corrupt)
        skipped_total += skipped
        captions.append(fastclip.tokenizer.decode(tokens, skip_special=True).strip())
    assert skipped_total == len(failed_reads) and set(failed_reads) == set(corrupt)
    # the caption always belongs to the image that was actually used
    for index in corrupt:
        assert captions[index] != f"caption number {index}"


def test_corrupt_images_never_crash_dataloader_workers(tmp_path):
    corrupt = {0: "garbage", 7: "truncated", 8: "garbage", 30: "missing"}
    dataset = CsvDataset(write_pairs(tmp_path, 37, corrupt), _transform(), TOKENIZER)
    data = TrainBatches(dataset, batch_size=6, workers=2)
    batches = list(data.epoch(0))
    assert len(batches) == 37 // 6
    assert all(images.shape == (6, 3, 32, 32) for images, _, _ in batches)
    used = list(ShardedEpochSampler(37, 6, seed=0, epoch=0))
    expected = sum(dataset[index][2] for index in used)  # the same samples read in this process
    assert expected >= len(set(used) & set(corrupt)) > 0
    assert sum(skipped for _, _, skipped in batches) == expected


def test_csv_dataset_names_missing_columns(tmp_path):
    (tmp_path / "bad.csv").write_text("path\tcaption\nx.png\thello\n")
    with pytest.raises(ValueError, match="--csv-img-key"):
        CsvDataset(tmp_path / "bad.csv", _transform(), TOKENIZER)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_shards_are_disjoint_equal_and_cover_whole_global_batches(world_size):
    size, batch = 101, 4
    shards = [list(ShardedEpochSampler(size, batch, rank=r, world_size=world_size, seed=5, epoch=2))
              for r in range(world_size)]
    per_rank = (size // (batch * world_size)) * batch
    assert all(len(shard) == per_rank for shard in shards)
    flat = [index for shard in shards for index in shard]
    assert len(set(flat)) == len(flat)
    other_epoch = list(ShardedEpochSampler(size, batch, rank=0, world_size=world_size, seed=5, epoch=3))
    assert other_epoch != shards[0]


def test_sampler_resume_yields_exactly_the_remaining_batches():
    full = list(ShardedEpochSampler(90, 8, rank=1, world_size=2, seed=1, epoch=4))
    resumed = list(ShardedEpochSampler(90, 8, rank=1, world_size=2, seed=1, epoch=4, start_batch=3))
    assert resumed == full[3 * 8:]


def test_seeded_augmentation_replays_per_sample_and_leaves_the_global_rng_alone(tmp_path):
    dataset = CsvDataset(write_pairs(tmp_path, 5), fastclip.image_transform(32, train=True), TOKENIZER,
                         seed=9, seed_augmentation=True)
    dataset.set_epoch(1)
    before = torch.get_rng_state()
    first = dataset[2][0]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(dataset[2][0], first)
    dataset.set_epoch(2)
    assert not torch.equal(dataset[2][0], first)


def test_synthetic_dataset_is_a_pure_function_of_the_index():
    one = SyntheticShapesDataset(50, _transform(64), TOKENIZER, seed=4)
    two = SyntheticShapesDataset(50, _transform(64), TOKENIZER, seed=4)
    for index in (0, 17, 49):
        image_a, tokens_a, _ = one[index]
        image_b, tokens_b, _ = two[index]
        assert torch.equal(image_a, image_b) and torch.equal(tokens_a, tokens_b)
    _, caption, label = one.example(3)
    assert fastclip.data.shapes.class_names()[label].split()[1] in caption


def test_collate_trims_shared_padding_without_changing_text_features():
    tokens = TOKENIZER(["a red star", "a much longer caption about a small green ring"])
    trimmed = trim_padding(tokens)
    assert trimmed.shape[1] == int((tokens != 0).sum(1).max())
    model = fastclip.create_model("fastclip-tiny").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(trimmed), model.encode_text(tokens), rtol=1e-5, atol=1e-5)
    images, batch_tokens, skipped = collate_pairs([(torch.zeros(3, 2, 2), tokens[0], 1),
                                                   (torch.ones(3, 2, 2), tokens[1], 2)])
    assert images.shape == (2, 3, 2, 2) and skipped == 3 and torch.equal(batch_tokens, trimmed)


def test_webdataset_reads_shards_per_rank_skips_corrupt_images_and_replays_an_epoch(tmp_path):
    from fastclip.data.webdataset_dataset import WebDatasetPairs

    urls = write_shards(tmp_path, shards=4, per_shard=20, corrupt_every=9)
    counts = []
    for rank in range(2):
        dataset = WebDatasetPairs(urls, _transform(), TOKENIZER, rank=rank, world_size=2, seed=1, shuffle_buffer=8)
        data = TrainBatches(dataset, batch_size=5, rank=rank, world_size=2, seed=1, workers=1, num_samples=60)
        first = list(data.epoch(0))
        assert len(first) == 6 and all(images.shape == (5, 3, 32, 32) for images, _, _ in first)
        counts.append(sum(skipped for _, _, skipped in first))
        again = list(data.epoch(0, start_batch=2))  # a resumed epoch replays the same batches
        assert all(torch.equal(a[1], b[1]) for a, b in zip(first[2:], again))
    assert sum(counts) > 0
