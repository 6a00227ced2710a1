"""``pure_bf16`` / ``pure_fp16`` (issue 12): open_clip's meaning, a whole model in that dtype and no autocast."""
import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from fastclip.train import TrainConfig
from fastclip.train.build import build_model, build_parts, build_train_data
from fastclip.distributed.comm import World
from fastclip.train.loop import TrainState, train_step
from fastclip.train.main import main
from fastclip.train.optim import LearningRateSchedule

PURE = {"pure_bf16": torch.bfloat16, "pure_fp16": torch.float16}


def _config(precision, **extra):
    return TrainConfig(dataset_type="synthetic", train_num_samples=16, batch_size=8, epochs=1, force_image_size=32,
                       workers=0, lr=1e-3, warmup=1, precision=precision, no_progress=True, **extra)


@pytest.mark.parametrize("precision", sorted(PURE))
def test_a_pure_step_runs_in_that_dtype_without_autocast_and_the_loss_in_fp32(precision):
    dtype, config, ctx = PURE[precision], _config(precision), World(device=torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(config, ctx)
    # open_clip's pure modes: model.to(dtype), every floating tensor of the model in that dtype
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert {name for name, t in tensors.items() if t.is_floating_point() and t.dtype != dtype} == set()
    parts, _ = build_parts(config, ctx, model, lineage={})
    parts.schedule = LearningRateSchedule(config.lr, config.warmup, 1)
    images, tokens, _ = next(build_train_data(config, ctx, 32, model.context_length).batches.epoch(0))

    seen = {}
    model.register_forward_hook(lambda module, args, output: seen.update(
        autocast=torch.is_autocast_enabled("cpu"), features={k: output[k].detach() for k in
                                                              ("image_features", "text_features", "logit_scale")}))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    values = train_step(parts, TrainState(), images, tokens)
    assert seen["autocast"] is False
    assert values["skipped_step"] == 0 and values["loss"] == values["loss"]
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert changed and all(p.dtype == dtype for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # dropped after the step, as in fp32

    # the loss of those low-precision features: fastclip's in fp32, at least as close to fp64 as open_clip's
    features = seen["features"]
    ours = parts.loss_fn(**features)
    theirs = open_clip.ClipLoss()(**features)
    oracle = open_clip.ClipLoss()(**{k: v.double() for k, v in features.items()})
    assert ours.dtype == torch.float32 and theirs.dtype == dtype
    assert abs(ours.double() - oracle) <= abs(theirs.double() - oracle) + 1e-6


@pytest.mark.parametrize("precision", sorted(PURE))
def test_the_cli_trains_with_a_pure_precision_and_saves_weights_of_that_dtype(tmp_path, precision):
    assert main(["--dataset-type", "synthetic", "--train-num-samples", "16", "--batch-size", "8", "--epochs", "1",
                 "--force-image-size", "32", "--workers", "0", "--no-progress", "--lr", "1e-4",
                 "--precision", precision, "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["precision"] == precision and results["steps"] == 2 and results["nonfinite_steps"] == 0
    weights = load_file(str(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert {value.dtype for value in weights.values() if value.is_floating_point()} == {PURE[precision]}
