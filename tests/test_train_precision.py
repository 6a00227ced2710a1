"""open_clip's precision modes in the trainer: ``pure_bf16`` / ``pure_fp16`` (issue 12), a whole model in that dtype
and no autocast; ``bf16`` / ``fp16`` (issue 18), only the matmul weights; the default precision per device."""
import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

import fastclip
import fastclip.train.main as train_main
from fastclip.distributed.comm import World
from fastclip.precision import default_precision
from fastclip.train import TrainConfig
from fastclip.train.build import build_model, build_parts, build_train_data
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


# ------------------------------------------------------------------ bf16 / fp16: open_clip's mixed weights

MIXED = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _open_clip_dtypes(config, precision):
    """{key: dtype} of open_clip's model of ``config`` at ``precision`` (its own convert_weights_to_lp)."""
    model = open_clip.model.CLIP(**config.to_open_clip(), cast_dtype=MIXED[precision])
    open_clip.model.convert_weights_to_lp(model, MIXED[precision])
    return {key: value.dtype for key, value in model.state_dict().items()}


@pytest.mark.parametrize("precision", sorted(MIXED))
def test_a_mixed_step_updates_each_weight_in_its_own_dtype_without_autocast(precision):
    """open_clip_train's bf16/fp16: the matmul weights low, the rest fp32, no autocast, no GradScaler."""
    config, ctx = _config(precision), World(device=torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(config, ctx)
    dtypes = {key: value.dtype for key, value in model.state_dict().items()}
    assert dtypes == _open_clip_dtypes(model.config, precision)
    parts, _ = build_parts(config, ctx, model, lineage={})
    assert parts.scaler is None
    parts.schedule = LearningRateSchedule(config.lr, config.warmup, 1)
    images, tokens, _ = next(build_train_data(config, ctx, 32, model.context_length).batches.epoch(0))
    seen = {}
    model.register_forward_hook(lambda module, args, output: seen.update(autocast=torch.is_autocast_enabled("cpu")))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    values = train_step(parts, TrainState(), images, tokens)
    assert seen["autocast"] is False and values["skipped_step"] == 0 and values["loss"] == values["loss"]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert {"visual.conv1.weight", "text_projection", "ln_final.weight", "positional_embedding"} <= changed
    assert {key: value.dtype for key, value in model.state_dict().items()} == dtypes


def test_the_cli_saves_bf16_weights_with_open_clips_dtypes_key_by_key(tmp_path):
    assert main(["--dataset-type", "synthetic", "--train-num-samples", "16", "--batch-size", "8", "--epochs", "1",
                 "--force-image-size", "32", "--workers", "0", "--no-progress", "--lr", "1e-4",
                 "--precision", "bf16", "--output-dir", str(tmp_path)]) == 0
    weights = load_file(str(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors"))
    config = fastclip.create_model("fastclip-tiny", image_size=32, device="meta").config
    expected = _open_clip_dtypes(config, "bf16")
    assert {key: value.dtype for key, value in weights.items()} == expected
    assert {torch.bfloat16, torch.float32} <= set(expected.values())


# -------------------------------------------------------------------------- the default per device kind

@pytest.mark.parametrize("capability, expected", [((7, 0), "amp"), ((7, 5), "amp"), ((8, 0), "amp_bf16"),
                                                  ((8, 9), "amp_bf16"), ((9, 0), "amp_bf16")])
def test_the_default_precision_follows_the_gpu(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    precision, why = default_precision(torch.device("cuda"))
    assert precision == expected and f"sm{capability[0]}{capability[1]}" in why
    assert default_precision(torch.device("cpu"))[0] == "fp32"


def test_without_precision_the_trainer_takes_the_devices_default_and_says_why(monkeypatch, tmp_path, capsys):
    """On CPU: fp32. With the default of an sm70 GPU (mocked; the run itself stays on CPU): amp, and a GradScaler."""
    args = ["--dataset-type", "synthetic", "--train-num-samples", "8", "--batch-size", "8", "--epochs", "1",
            "--force-image-size", "32", "--workers", "0", "--no-progress"]
    assert TrainConfig().precision is None
    assert main([*args, "--output-dir", str(tmp_path / "cpu")]) == 0
    assert "precision fp32 (the default on cpu)" in capsys.readouterr().out
    assert json.loads((tmp_path / "cpu" / "results.json").read_text())["precision"] == "fp32"

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(train_main, "default_precision", lambda device: default_precision(torch.device("cuda")))
    assert main([*args, "--output-dir", str(tmp_path / "v100")]) == 0
    assert "precision amp (the default on this sm70 GPU, which has fp16 but no bf16" in capsys.readouterr().out
    assert json.loads((tmp_path / "v100" / "results.json").read_text())["precision"] == "amp"
