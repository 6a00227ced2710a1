"""fastclip's SigLipLoss against open_clip (fp32, 1e-5), an fp64 truth (fp16/bf16), gradcheck, memory, errors."""
from __future__ import annotations

import pytest
import torch
from open_clip.loss import SigLipLoss as OpenSigLipLoss

from fastclip.loss import SigLipLoss, siglip_loss
from tests.loss_utils import clip_like_features, loss_and_grads
from tests.numerics import assert_close_to_truth, assert_matches_reference

SCALE, BIAS = 10.0, -10.0  # SigLIP's initialisation: t' = log 10, b = -10


@pytest.mark.parametrize("batch", [1, 37, 1000])
@pytest.mark.parametrize("dim", [3, 200, 768])
@pytest.mark.parametrize("output_dict", [False, True])
def test_values_and_gradients_match_open_clip(batch, dim, output_dict):
    image, text = clip_like_features(batch, dim, seed=batch * 7 + dim)
    ours = loss_and_grads(SigLipLoss(), image, text, SCALE, BIAS, output_dict=output_dict)
    reference = loss_and_grads(OpenSigLipLoss(), image, text, SCALE, BIAS, output_dict=output_dict)
    for name in ("loss", "image", "text", "logit_scale", "logit_bias"):
        assert_matches_reference(ours[name], reference[name], name=name)


def test_without_bias_and_with_a_trained_temperature():
    image, text = clip_like_features(300, 64, seed=3, correlated=3.0)
    for bias in (None, 2.0):
        ours = loss_and_grads(lambda i, t, s: SigLipLoss()(i, t, s, bias), image, text, 30.0)
        reference = loss_and_grads(lambda i, t, s: OpenSigLipLoss()(i, t, s, bias), image, text, 30.0)
        for name in ("loss", "image", "text", "logit_scale"):
            assert_matches_reference(ours[name], reference[name], name=f"bias={bias} {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_as_accurate_as_torch_in_that_dtype(dtype):
    image, text = clip_like_features(300, 64, dtype, seed=5)
    ours = loss_and_grads(SigLipLoss(), image, text, SCALE, BIAS)
    baseline = loss_and_grads(OpenSigLipLoss(), image, text, SCALE, BIAS)
    truth = loss_and_grads(OpenSigLipLoss(), image.double(), text.double(), SCALE, BIAS)
    assert_close_to_truth(ours["loss"], baseline["loss"], truth["loss"], dtype=dtype, kind="fwd", name="loss")
    for name in ("image", "text", "logit_scale", "logit_bias"):
        assert_close_to_truth(ours[name], baseline[name], truth[name], dtype=dtype, kind="bwd", name=f"grad {name}")


def test_gradcheck_float64():
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(6, 4, dtype=torch.float64, generator=generator, requires_grad=True),
              torch.randn(6, 4, dtype=torch.float64, generator=generator, requires_grad=True),
              torch.tensor(1.7, dtype=torch.float64, requires_grad=True),
              torch.tensor(-0.8, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda i, t, s, b: siglip_loss(i, t, s, b), inputs)


def test_small_workspace_chunks_give_the_same_result(monkeypatch):
    image, text = clip_like_features(300, 48, seed=9)
    whole = loss_and_grads(SigLipLoss(), image, text, SCALE, BIAS)
    monkeypatch.setenv("FASTCLIP_WORKSPACE_MB", "0.02")
    chunked = loss_and_grads(SigLipLoss(), image, text, SCALE, BIAS)
    for name in ("loss", "image", "text", "logit_scale", "logit_bias"):
        assert_matches_reference(chunked[name], whole[name], name=name, rtol=1e-6)


def test_saves_only_inputs_for_backward(monkeypatch):
    monkeypatch.setenv("FASTCLIP_WORKSPACE_MB", "1")
    batch, dim = 1000, 16
    image, text = (x.requires_grad_() for x in clip_like_features(batch, dim, seed=2))
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        siglip_loss(image, text, torch.tensor(SCALE, requires_grad=True), torch.tensor(BIAS, requires_grad=True))
    assert saved <= 2 * batch * dim * 4 + 64


def test_non_finite_features_give_a_non_finite_loss():
    image, text = clip_like_features(37, 16, seed=1)
    text[3, 0] = float("nan")
    assert not torch.isfinite(siglip_loss(image, text, SCALE, BIAS))


@pytest.mark.parametrize("call,error,match", [
    (lambda i, t: siglip_loss(i, t[:-1], 2.0, 0.0), ValueError, "same shape"),
    (lambda i, t: siglip_loss(i, t, 0.0, 0.0), ValueError, "> 0"),
    (lambda i, t: siglip_loss(i, t, 2.0, float("nan")), ValueError, "finite"),
    (lambda i, t: siglip_loss(i, t, 2.0, torch.ones(3)), ValueError, "one value"),
    (lambda i, t: SigLipLoss(dist_impl="allgather"), ValueError, "dist_impl"),
    (lambda i, t: SigLipLoss(world_size=2, rank=1)(i, t, 2.0, 0.0), ValueError, "init_process_group"),
])
def test_bad_input_raises_an_error_that_names_the_fix(call, error, match):
    image, text = clip_like_features(8, 4, seed=0)
    with pytest.raises(error, match=match):
        call(image, text)
