"""The loss API's options beyond open_clip 3.x: ClipLoss(reduction), normalize for SigLIP, SigLipLoss(chunk_size),
the fp32 loss of 16-bit features, and the value of the CLIP loss at tiny batches (never negative, 0 at B=1)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss

from fastclip.loss import ClipLoss, SigLipLoss, clip_loss, siglip_loss
from tests.loss_utils import clip_like_features, loss_and_grads
from tests.numerics import assert_close_to_truth, assert_matches_reference

LOGIT_SCALE = 1 / 0.07
LOGIT_BIAS = -10.0


def _per_pair_truth(image, text, scale):
    """open_clip's two cross-entropies per pair, by torch's F.cross_entropy in fp64 (B x B materialised)."""
    logits = scale * image.double() @ text.double().T
    labels = torch.arange(image.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels,
                                                                                         reduction="none"))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_clip_loss_module_takes_reduction_like_the_function(reduction):
    image, text = clip_like_features(37, 200, seed=101)
    weights = torch.linspace(0.5, 2.0, 37, dtype=torch.float64)

    def weighted(loss):  # a scalar whose gradient weights each pair differently for "none"
        return lambda *args: (loss(*args) * (weights.float() if reduction == "none" else 1.0)).sum()

    module = loss_and_grads(weighted(ClipLoss(reduction=reduction)), image, text, LOGIT_SCALE)
    function = loss_and_grads(weighted(lambda i, t, s: clip_loss(i, t, s, reduction=reduction)), image, text,
                              LOGIT_SCALE)
    per_pair = _per_pair_truth(image, text, LOGIT_SCALE)
    truth = {"mean": per_pair.mean(), "sum": per_pair.sum(), "none": (per_pair * weights).sum()}[reduction]
    assert_matches_reference(module["loss"], truth.float(), name=f"ClipLoss(reduction={reduction!r})", floor=1.0)
    for name in ("loss", "image", "text", "logit_scale"):
        assert torch.equal(module[name], function[name]), f"{name}: ClipLoss and clip_loss differ for {reduction}"


def test_clip_loss_module_refuses_an_unknown_reduction_when_built():
    with pytest.raises(ValueError, match="reduction='max'.*mean, sum, none"):
        ClipLoss(reduction="max")


@pytest.mark.parametrize("use_module", [True, False], ids=["SigLipLoss", "siglip_loss"])
def test_siglip_normalize_matches_open_clip_on_normalised_features(use_module):
    generator = torch.Generator().manual_seed(103)
    image, text = (3.0 * torch.randn(37, 200, generator=generator) for _ in range(2))  # far from unit norm
    ours_loss = (SigLipLoss(normalize=True) if use_module
                 else lambda i, t, s, b: siglip_loss(i, t, s, b, normalize=True))
    ours = loss_and_grads(ours_loss, image, text, LOGIT_SCALE, LOGIT_BIAS)
    reference = loss_and_grads(lambda i, t, s, b: OpenSigLipLoss()(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s,
                                                                   b), image, text, LOGIT_SCALE, LOGIT_BIAS)
    assert_matches_reference(ours["loss"], reference["loss"], name="loss", floor=1.0)
    for name in ("image", "text", "logit_scale", "logit_bias"):
        assert_matches_reference(ours[name], reference[name], name=f"grad {name}")


@pytest.mark.parametrize("chunk_size", [0, 1, 16])
def test_siglip_chunk_size_is_accepted_and_changes_nothing(chunk_size):
    image, text = clip_like_features(37, 64, seed=107)
    ours = loss_and_grads(SigLipLoss(chunk_size=chunk_size), image, text, LOGIT_SCALE, LOGIT_BIAS)
    default = loss_and_grads(SigLipLoss(), image, text, LOGIT_SCALE, LOGIT_BIAS)
    for name in ours:
        assert torch.equal(ours[name], default[name]), f"{name} changes with chunk_size={chunk_size}"


@pytest.mark.parametrize("chunk_size", [-1, 2.5, True])
def test_siglip_bad_chunk_size_is_a_clear_error(chunk_size):
    with pytest.raises(ValueError, match="chunk_size.*int >= 0"):
        SigLipLoss(chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_of_16_bit_features_is_fp32_as_documented(dtype):
    """open_clip returns the features' dtype; fastclip returns its fp32 accumulation (docstring of clip_loss)."""
    image, text = clip_like_features(37, 64, dtype, seed=109)
    assert clip_loss(image, text, LOGIT_SCALE).dtype == torch.float32
    assert siglip_loss(image, text, LOGIT_SCALE, LOGIT_BIAS).dtype == torch.float32
    assert OpenClipLoss()(image, text, torch.tensor(LOGIT_SCALE, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, LOGIT_SCALE, 100.0])
def test_batch_of_one_has_loss_exactly_zero(dtype, scale):
    for seed in range(8):
        image, text = clip_like_features(1, 200, dtype, seed=seed)
        result = loss_and_grads(ClipLoss(), image, text, scale)
        assert result["loss"].item() == 0.0, f"seed {seed}: B=1 loss is {result['loss'].item()!r}, not 0"
        for name in ("image", "text", "logit_scale"):
            assert result[name].abs().max().item() == 0.0, f"seed {seed}: B=1 grad {name} is not 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [2, 3, 5])
@pytest.mark.parametrize("scale", [LOGIT_SCALE, 100.0])
def test_small_batches_are_as_accurate_as_torch_in_that_dtype(dtype, batch, scale):
    """At scale 100 the per-pair CE lse_i - S_ii is a small difference of ~30-sized numbers: S_ii must
    be the tile's own logit (the forward's positive_logit), a separate row dot missed it by ~|S| eps."""
    for seed in range(10):
        image, text = clip_like_features(batch, 200, dtype, seed=1000 * batch + seed)
        ours = clip_loss(image, text, scale)
        baseline = OpenClipLoss()(image, text, torch.tensor(scale, dtype=dtype))
        truth = OpenClipLoss()(image.double(), text.double(), torch.tensor(scale, dtype=torch.float64))
        # The value is a difference of logits of size up to ``scale``: its rounding is relative to them,
        # not to the (tiny) loss, so the floor is the logits' magnitude.
        assert_close_to_truth(ours, baseline, truth, dtype=dtype, kind="fwd", floor=scale,
                              name=f"B={batch} scale {scale:.1f} seed {seed} loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_is_never_negative_when_every_pair_dominates(dtype):
    """Aligned pairs at scale 100: the exact loss is ~1e-20, and rounding must not take it below 0."""
    for seed in range(10):
        for reduction in ("mean", "none"):
            image, text = clip_like_features(5, 64, dtype, seed=seed, correlated=30.0)
            loss = clip_loss(image, text, 100.0, reduction=reduction)
            assert (loss >= 0).all(), f"seed {seed}, reduction {reduction}: negative loss {loss.tolist()}"
