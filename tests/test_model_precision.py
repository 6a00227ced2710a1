"""``create_model(precision=)`` means what open_clip's does (issue 18): ``bf16``/``fp16`` cast only the matmul
weights, ``pure_*`` everything; the dtypes equal open_clip's key by key and so do the forward and its gradients."""
import pytest
import torch
from safetensors.torch import load_file

import fastclip
from fastclip.model import CONFIGS, create_model, model_from_state_dict, save_model
from tests.model_utils import perturb

open_clip = pytest.importorskip("open_clip")

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
# |ours - truth| <= K * |open_clip - truth| + tol. Backward is looser: in train mode the two attention paths
# (fastclip's Attention, open_clip's nn.MultiheadAttention) round differently, and the gradient compounds it
# (measured: worst tensor 2.1x open_clip's error on logit_scale, over all gradients 1.0-1.1x).
K_FORWARD, K_BACKWARD, K_BACKWARD_TOTAL = 2.0, 3.0, 1.5
CAPTIONS = ["a photo of a cat", "two red circles and a blue square", "x", "a dog on a striped background", "dog"]


def _dtypes(state_dict):
    return {key: value.dtype for key, value in state_dict.items()}


def _differing(ours, theirs):
    assert set(ours) == set(theirs)
    return sorted(f"{key}: {ours[key]} vs open_clip {theirs[key]}" for key in ours if ours[key] != theirs[key])


def _open_clip_tiny(name, precision=None, seed=0):
    """open_clip's model of one of fastclip's small configs (open_clip has no such name), cast by open_clip's
    own ``convert_weights_to_lp`` as its ``create_model(precision=)`` does for bf16/fp16."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**CONFIGS[name].to_open_clip(), cast_dtype=LOW.get(precision), output_dict=True)
    perturb(model, seed)
    if precision is not None:
        open_clip.model.convert_weights_to_lp(model, LOW[precision])
    return model.eval()


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "pure_bf16", "pure_fp16", "fp32", "amp_bf16"])
def test_weight_dtypes_equal_open_clips_key_by_key(name, precision):
    """Built without weights, on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        theirs = _dtypes(open_clip.create_model(name, precision=precision, device="meta").state_dict())
    ours = _dtypes(create_model(name, precision=precision, device="meta").state_dict())
    assert _differing(ours, theirs) == []
    floating = {dtype for dtype in ours.values() if dtype.is_floating_point}
    if precision in LOW:  # a real mix: matmul weights low, LayerNorm / embeddings / logit_scale fp32
        assert floating == {LOW[precision], torch.float32}
        assert ours["logit_scale"] == ours["positional_embedding"] == torch.float32
        assert ours["text_projection"] == LOW[precision]


@pytest.mark.parametrize("name", ["fastclip-tiny", "RN-Tiny"])
def test_saved_weights_keep_open_clips_dtypes_and_reload_with_them(tmp_path, name):
    ours = create_model(name, precision="bf16")
    path = save_model(ours, tmp_path / "model.safetensors")
    saved = _dtypes(load_file(str(path)))
    assert _differing(saved, _dtypes(_open_clip_tiny(name, "bf16").state_dict())) == []
    assert _dtypes(model_from_state_dict(path, precision="bf16").state_dict()) == saved
    assert {dtype for dtype in _dtypes(create_model(pretrained=path).state_dict()).values()
            if dtype.is_floating_point} == {torch.float32}  # default precision fp32: everything back to fp32


def _same_weights(name, precision):
    """(ours, open_clip's, an fp64 open_clip model): the same low-precision-rounded weights in all three."""
    theirs = _open_clip_tiny(name, precision, seed=3)
    fp32 = {key: value.float() if value.is_floating_point() else value for key, value in theirs.state_dict().items()}
    ours = model_from_state_dict(fp32, name=name, precision=precision).eval()
    for key, value in ours.state_dict().items():
        assert value.dtype == theirs.state_dict()[key].dtype and torch.equal(value, theirs.state_dict()[key]), key
    truth = open_clip.model.CLIP(**CONFIGS[name].to_open_clip(), output_dict=True).double().eval()
    truth.load_state_dict(fp32)
    return ours, theirs, truth


def _within_open_clips_error(label, ours, theirs, truth, k=K_FORWARD):
    """|ours - truth| <= k |open_clip - truth| + tol, both in the same low dtype (tol: a few ulps of the scale)."""
    assert ours.dtype == theirs.dtype, f"{label}: dtype {ours.dtype} vs open_clip {theirs.dtype}"
    error = (ours.double() - truth).norm().item()
    reference = (theirs.double() - truth).norm().item()
    tol = 4 * torch.finfo(ours.dtype).eps * truth.norm().item()
    assert error <= k * reference + tol, f"{label}: error {error:.3e} vs open_clip's {reference:.3e} (tol {tol:.1e})"


@pytest.mark.parametrize("name", ["fastclip-tiny", "RN-Tiny"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_forward_matches_open_clip_on_the_same_weights(name, precision):
    ours, theirs, truth = _same_weights(name, precision)
    size = CONFIGS[name].vision.image_size
    images = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(7))
    tokens = fastclip.tokenize(CAPTIONS)
    with torch.no_grad():
        expected = truth.encode_image(images.double()), truth.encode_text(tokens)
        # open_clip's trainer casts the images to get_input_dtype(precision); fastclip's encode_image does it
        image_features = ours.encode_image(images), theirs.encode_image(images.to(LOW[precision]))
        text_features = ours.encode_text(tokens), theirs.encode_text(tokens)
    _within_open_clips_error("encode_image", *image_features, expected[0])
    _within_open_clips_error("encode_text", *text_features, expected[1])


def test_gradients_of_a_mixed_bf16_model_match_open_clips():
    """open_clip_train's bf16: no autocast, the loss's gradient lands in each parameter's own dtype."""
    name = "fastclip-tiny"
    ours, theirs, truth = _same_weights(name, "bf16")
    size = CONFIGS[name].vision.image_size
    images = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(8))
    tokens = fastclip.tokenize(CAPTIONS)
    for model, image_dtype in ((ours, torch.float32), (theirs, torch.bfloat16), (truth, torch.float64)):
        model.train()
        output = model(images.to(image_dtype), tokens)
        features = {key: output[key] for key in ("image_features", "text_features", "logit_scale")}
        open_clip.ClipLoss()(**features).backward()
    theirs_grads = dict(theirs.named_parameters())
    total_error = total_reference = 0.0
    for key, parameter in truth.named_parameters():
        mine, other = ours.get_parameter(key).grad, theirs_grads[key].grad
        assert mine.dtype == other.dtype == theirs_grads[key].dtype, key
        _within_open_clips_error(f"grad {key}", mine, other, parameter.grad, k=K_BACKWARD)
        total_error += (mine.double() - parameter.grad).norm().item() ** 2
        total_reference += (other.double() - parameter.grad).norm().item() ** 2
    assert total_error <= K_BACKWARD_TOTAL ** 2 * total_reference, (total_error, total_reference)


def test_precision_is_checked_and_not_mixed_with_dtype():
    with pytest.raises(ValueError, match="is not one of"):
        create_model("fastclip-tiny", precision="bfloat16", device="meta")
    with pytest.raises(ValueError, match="give one of them"):
        create_model("fastclip-tiny", precision="bf16", dtype=torch.bfloat16, device="meta")
    model = create_model("fastclip-tiny", precision="amp_bfloat16", device="meta")  # open_clip's alias: fp32 weights
    assert {p.dtype for p in model.parameters()} == {torch.float32}
