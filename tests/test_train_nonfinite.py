"""Non-finite steps are skipped (weights and optimiser untouched) and counted; N in a row abort the run."""
import json

import pytest
import torch

import fastclip.train.loop as loop
from fastclip.train.main import main


def tiny_run_args(output_dir, *extra):
    return ["--dataset-type", "synthetic", "--train-num-samples", "64", "--batch-size", "8", "--epochs", "1",
            "--force-image-size", "32", "--workers", "0", "--lr", "1e-3", "--warmup", "2", "--no-progress",
            "--save-frequency", "0", "--output-dir", str(output_dir), *extra]


def _poison(monkeypatch, poisoned_steps):
    """Feed NaN pixels on the given 1-based steps (a real NaN through model, loss and backward) and record
    the weights each step starts from."""
    seen = []
    original = loop.forward_backward

    def forward_backward(model, loss_fn, images, tokens, **kwargs):
        seen.append({name: p.detach().clone() for name, p in model.named_parameters()})
        if len(seen) in poisoned_steps:
            images = images * float("nan")
        return original(model, loss_fn, images, tokens, **kwargs)

    monkeypatch.setattr(loop, "forward_backward", forward_backward)
    return seen


def _same(a, b):
    return all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("precision", ["fp32", "amp"])
def test_nonfinite_steps_are_skipped_counted_and_training_goes_on(monkeypatch, tmp_path, precision):
    weights = _poison(monkeypatch, poisoned_steps={3, 4})
    assert main(tiny_run_args(tmp_path, "--precision", precision)) == 0
    assert len(weights) == 8
    # weights entering steps 4 and 5 are those entering step 3: the poisoned updates were dropped
    assert _same(weights[3], weights[2]) and _same(weights[4], weights[2])
    assert not _same(weights[5], weights[4])  # step 5 was clean and applied
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped_step"] for r in records] == [0, 0, 1, 1, 0, 0, 0, 0]
    assert all(r["loss"] == r["loss"] for r in records if not r["skipped_step"])  # finite elsewhere
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["nonfinite_steps"] == 2 and results["steps"] == 8


def test_too_many_nonfinite_steps_in_a_row_abort_with_a_clear_message(monkeypatch, tmp_path, capsys):
    _poison(monkeypatch, poisoned_steps=set(range(1, 100)))
    assert main(tiny_run_args(tmp_path, "--max-nonfinite-steps", "3")) == 3
    error = capsys.readouterr().err
    assert "3 steps in a row" in error and "non-finite" in error and "--max-nonfinite-steps" in error
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 2  # the aborting step is not logged
