"""GradCache-style accumulation: the accumulated gradient equals the full-batch gradient (same masks)."""
import random

import pytest
import torch

import fastclip
from fastclip.data.collate import trim_padding
from fastclip.data.shapes import CAPTION_TEMPLATES
from fastclip.loss import ClipLoss, SigLipLoss
from fastclip.train import accumulation
from fastclip.train.accumulation import forward_backward

CPU = torch.device("cpu")
BATCH, ACCUM = 39, 3  # micro-batches of 13


def _batch(batch=BATCH):
    words = dict(size="small", colour="red", shape="star", background="gray", position="center")
    captions = []
    for _ in range(batch):
        words.update(colour=random.choice(["red", "blue", "pink"]), shape=random.choice(["ring", "heart"]))
        captions.append(random.choice(CAPTION_TEMPLATES).format(**words))
    return torch.randn(batch, 3, 64, 64), trim_padding(fastclip.tokenize(captions))


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max().item() + 1e-12
        error = (actual[name] - expected[name]).abs().max().item()
        assert error <= 2e-4 * scale, f"{name}: max error {error:.3g} vs gradient scale {scale:.3g}"


@pytest.mark.parametrize("loss_type", ["clip", "siglip"])
def test_accumulated_gradient_equals_full_batch_gradient(loss_type):
    name = "fastclip-tiny" if loss_type == "clip" else "fastclip-tiny-siglip"
    model = fastclip.create_model(name)
    loss_fn = ClipLoss() if loss_type == "clip" else SigLipLoss()
    images, tokens = _batch()

    full_loss = forward_backward(model, loss_fn, images, tokens, precision="fp32", device=CPU, accum_freq=1)
    full = _grads(model)
    model.zero_grad(set_to_none=True)
    accumulated_loss = forward_backward(model, loss_fn, images, tokens, precision="fp32", device=CPU,
                                        accum_freq=ACCUM)
    torch.testing.assert_close(accumulated_loss, full_loss, rtol=1e-5, atol=1e-6)
    _assert_same_grads(_grads(model), full)
    assert "logit_scale" in full  # the temperature gradient is counted once, not ACCUM times


def test_rng_replay_reproduces_patch_dropout_masks(monkeypatch):
    model = fastclip.create_model("fastclip-tiny", patch_dropout=0.5)
    loss_fn = ClipLoss()
    images, tokens = _batch()
    seed = random.randrange(2**31)

    # oracle: the micro-batches forwarded in sequence with grad from the same seed, one loss on all features
    torch.manual_seed(seed)
    outputs = [model(i, t) for i, t in zip(images.chunk(ACCUM), tokens.chunk(ACCUM))]
    rng_after_oracle = torch.get_rng_state()
    loss_fn(torch.cat([o["image_features"] for o in outputs]), torch.cat([o["text_features"] for o in outputs]),
            outputs[-1]["logit_scale"]).backward()
    oracle = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(seed)
    forward_backward(model, loss_fn, images, tokens, precision="fp32", device=CPU, accum_freq=ACCUM)
    _assert_same_grads(_grads(model), oracle)
    assert torch.equal(torch.get_rng_state(), rng_after_oracle)  # the RNG stream advances as without caching

    # without the replay the re-forward draws new masks and the gradient is wrong
    monkeypatch.setattr(accumulation.RngSnapshot, "restore", lambda self, device: None)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    forward_backward(model, loss_fn, images, tokens, precision="fp32", device=CPU, accum_freq=ACCUM)
    unreplayed = _grads(model)
    assert any((unreplayed[k] - oracle[k]).abs().max() > 1e-2 * oracle[k].abs().max() for k in oracle)

def test_batch_not_divisible_by_accum_freq_is_rejected():
    model = fastclip.create_model("fastclip-tiny")
    images, tokens = _batch(10)
    with pytest.raises(ValueError, match="micro-batches"):
        forward_backward(model, ClipLoss(), images, tokens, precision="fp32", device=CPU, accum_freq=3)
