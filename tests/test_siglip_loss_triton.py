"""The Triton SigLIP loss kernels against an fp64 truth, the torch backend and open_clip.

Same setting as tests/test_clip_loss_triton.py: Triton's CPU interpreter without CUDA (small sizes),
real sizes under @pytest.mark.gpu, error bars from tests/numerics.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from fastclip.devices import triton_interpret_mode  # noqa: E402
from fastclip.loss import SigLipLoss  # noqa: E402
from fastclip.ops import siglip_loss_torch, siglip_loss_triton, triton_common  # noqa: E402
from tests.loss_utils import clip_like_features, loss_and_grads, siglip_grads_against_open_clip  # noqa: E402
from tests.numerics import assert_close_to_truth, assert_matches_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not triton_interpret_mode(),
                                reason="no GPU and TRITON_INTERPRET is unset (tests/conftest.py sets it)")
SCALE, BIAS = 10.0, -10.0  # SigLIP's initialisation


def open_clip_loss():
    """open_clip's SigLipLoss, the reference; tests that need it skip where it is not installed."""
    return pytest.importorskip("open_clip.loss").SigLipLoss()


@pytest.fixture(autouse=True)
def exact_fp32_dots(monkeypatch):
    """fp32 parity with open_clip (1e-5) needs IEEE dots on GPUs."""
    monkeypatch.setenv(triton_common.FP32_PRECISION_ENV, "ieee")


def random_block(n_rows, n_cols, dim, dtype, seed):
    """Unit-norm image rows / text columns, somewhat aligned pairs, a random scale, bias and grad_coef."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n_rows, dim, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n_cols, dim, generator=generator, dtype=torch.float64), dim=-1)
    text[: min(n_rows, n_cols)] += 0.7 * image[: min(n_rows, n_cols)]
    scale = float(torch.empty(()).uniform_(5, 30, generator=generator))
    bias = float(torch.empty(()).uniform_(-12, 2, generator=generator))
    scalar = lambda value: torch.tensor(value, dtype=torch.float32, device=DEVICE)  # noqa: E731
    return (image.to(DEVICE, dtype), text.to(DEVICE, dtype), scalar(scale), scalar(bias), scalar(1.0 / n_rows))


def dense_oracle(image, text, scale, bias, grad_coef, positive_offset, grad_dtype=None):
    """Plain PyTorch, materialising S: the fp64 truth, or with grad_dtype the same-dtype baseline that
    rounds G to that dtype before the fp32 GEMMs, as the torch backend does on GPUs."""
    compute = torch.float64 if grad_dtype is None else torch.float32
    image, text = image.to(compute), text.to(compute)
    logits = scale.to(compute) * (image @ text.T) + bias.to(compute)
    rows = torch.arange(image.shape[0], device=image.device)
    valid = (rows + positive_offset >= 0) & (rows + positive_offset < text.shape[0])
    signs = -torch.ones_like(logits)
    signs[rows[valid], rows[valid] + positive_offset] = 1.0
    grad = torch.sigmoid(logits) - (signs > 0).to(compute)
    if grad_dtype is not None:
        grad = grad.to(grad_dtype).to(compute)
    grad = grad * grad_coef.to(compute)
    return {"loss_sum": -F.logsigmoid(signs * logits).sum(), "grad_image": scale * grad @ text,
            "grad_text": scale * grad.T @ image, "grad_bias": grad.sum()}


def run_triton(image, text, scale, bias, grad_coef, positive_offset, deterministic=False):
    loss_sum = siglip_loss_triton.siglip_loss_fwd(image, text, scale, bias, positive_offset, deterministic)
    grad_image, grad_text, grad_bias = siglip_loss_triton.siglip_loss_bwd(image, text, scale, bias, positive_offset,
                                                                          grad_coef, deterministic)
    return {"loss_sum": loss_sum, "grad_image": grad_image, "grad_text": grad_text, "grad_bias": grad_bias}


# (dtype, rows b, columns n, D, positive_offset): awkward B and D, b != n blocks with the distributed
# layer's offsets (rank * b), an out-of-range offset (a block with no positives), D = 64 (EVEN_D).
PRIMITIVE_CASES = [
    (torch.float32, 37, 37, 200, 0),
    (torch.bfloat16, 37, 37, 257, 0),
    (torch.float16, 37, 37, 3, 0),
    (torch.float32, 1, 1, 3, 0),
    (torch.bfloat16, 70, 300, 64, 140),
    (torch.float32, 70, 100, 257, -70),
    (torch.float16, 300, 300, 200, 0),
]


@pytest.mark.parametrize("dtype,n_rows,n_cols,dim,offset", PRIMITIVE_CASES)
def test_primitives_match_the_fp64_truth(dtype, n_rows, n_cols, dim, offset):
    inputs = random_block(n_rows, n_cols, dim, dtype, seed=n_rows * 5 + n_cols + dim)
    ours = run_triton(*inputs, offset)
    truth = dense_oracle(*inputs, offset)
    forward_baseline = siglip_loss_torch.siglip_loss_fwd(*inputs[:4], offset, False)
    backward_baseline = dense_oracle(*inputs, offset, grad_dtype=dtype)
    assert_close_to_truth(ours["loss_sum"], forward_baseline, truth["loss_sum"], dtype=dtype, kind="fwd",
                          name="loss_sum")
    for name in ("grad_image", "grad_text", "grad_bias"):
        assert ours[name].dtype == torch.float32
        assert_close_to_truth(ours[name], backward_baseline[name], truth[name], dtype=dtype, kind="bwd", name=name)


@pytest.mark.parametrize("logit_bias", [BIAS, None])
def test_loss_matches_open_clip_in_fp32(logit_bias):
    image, text = clip_like_features(37, 200, seed=13)
    image, text = image.to(DEVICE), text.to(DEVICE)
    ours, reference = siglip_grads_against_open_clip(SigLipLoss(backend="triton"), open_clip_loss(), image, text,
                                                     SCALE, logit_bias)
    names = ("loss", "image", "text", "logit_scale") + (("logit_bias",) if logit_bias is not None else ())
    for name in names:
        assert_matches_reference(ours[name], reference[name], name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_loss_is_as_accurate_as_torch_in_that_dtype(dtype):
    image, text = clip_like_features(300, 64, dtype, seed=23)
    image, text = image.to(DEVICE), text.to(DEVICE)
    ours = loss_and_grads(SigLipLoss(backend="triton"), image, text, SCALE, BIAS)
    baseline = loss_and_grads(open_clip_loss(), image, text, SCALE, BIAS)
    truth = loss_and_grads(open_clip_loss(), image.double(), text.double(), SCALE, BIAS)
    assert_close_to_truth(ours["loss"], baseline["loss"], truth["loss"], dtype=dtype, kind="fwd", name="loss")
    for name in ("image", "text", "logit_scale", "logit_bias"):
        assert_close_to_truth(ours[name], baseline[name], truth[name], dtype=dtype, kind="bwd", name=f"grad {name}")


def test_deterministic_primitives_are_bitwise_repeatable():
    inputs = random_block(150, 150, 200, torch.bfloat16, seed=33)
    first, second = run_triton(*inputs, 0, deterministic=True), run_triton(*inputs, 0, deterministic=True)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two deterministic runs"


def test_every_output_element_is_written_with_chunked_workspaces(monkeypatch):
    monkeypatch.setattr(triton_common, "allocate",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    inputs = random_block(150, 200, 200, torch.float32, seed=43)
    truth = dense_oracle(*inputs, 30)
    monkeypatch.setenv("FASTCLIP_WORKSPACE_MB", "0.001")  # one row block per backward chunk
    ours = run_triton(*inputs, 30)
    for name, value in ours.items():
        assert not value.isnan().any(), f"{name} has elements no kernel wrote"
        assert_matches_reference(value, truth[name], name=f"chunked {name}")


def test_custom_ops_pass_opcheck():
    image, text, scale, bias, grad_coef = random_block(37, 45, 20, torch.float32, seed=53)
    torch.library.opcheck(siglip_loss_triton.siglip_loss_fwd, (image, text, scale, bias, 2, False))
    torch.library.opcheck(siglip_loss_triton.siglip_loss_bwd, (image, text, scale, bias, 2, grad_coef, False))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,n_rows,n_cols,dim,offset", [
    (torch.bfloat16, 8192, 8192, 768, 0), (torch.float16, 4096, 16384, 512, 4096),
    (torch.float32, 3001, 3001, 1280, 0)])
def test_gpu_real_sizes_match_the_fp64_truth(dtype, n_rows, n_cols, dim, offset):
    test_primitives_match_the_fp64_truth(dtype, n_rows, n_cols, dim, offset)


@pytest.mark.gpu
def test_gpu_deterministic_at_scale_and_chunked():
    inputs = random_block(32768, 32768, 512, torch.bfloat16, seed=83)
    first, second = run_triton(*inputs, 0, deterministic=True), run_triton(*inputs, 0, deterministic=True)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two deterministic runs"
