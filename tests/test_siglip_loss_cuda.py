"""The CUDA C++ SigLIP loss (backend="cuda", csrc/) against an fp64 truth, the torch backend and open_clip.

Same setting as tests/test_clip_loss_cuda.py: without a GPU the kernels' block programs and chunk loop
run in the host build (csrc/host_reference.cpp); checks on a GPU carry @pytest.mark.gpu.
"""
from __future__ import annotations

import pytest
import torch

from fastclip.backends import BACKENDS
from fastclip.loss import SigLipLoss
from fastclip.ops import cuda_common, siglip_loss_torch, workspace
from fastclip.ops.siglip_loss import SigLipLossFunction
from tests import cuda_host
from tests.cuda_host import host, host_library  # noqa: F401 (fixtures)
from tests.loss_utils import clip_like_features, loss_and_grads, siglip_grads_against_open_clip
from tests.numerics import assert_close_to_truth, assert_matches_reference

SCALE, BIAS = 10.0, -10.0  # SigLIP's initialisation
BACKWARD = ("grad_image", "grad_text", "grad_bias")


def open_clip_loss():
    return pytest.importorskip("open_clip.loss").SigLipLoss()


def run_primitives(op, image, text, scale, bias, positive_offset, grad_coef) -> dict:
    loss_sum = op.siglip_loss_fwd(image, text, scale, bias, positive_offset, True)
    grads = op.siglip_loss_bwd(image, text, scale, bias, positive_offset, grad_coef, True)
    return {"loss_sum": loss_sum, **dict(zip(BACKWARD, grads))}


def siglip_block(n_rows, n_cols, dim, seed, dtype=torch.float32, device="cpu"):
    image, text, scale, bias, _, _ = cuda_host.random_block(n_rows, n_cols, dim, seed, dtype=dtype, device=device)
    return image, text, scale, bias - 5.0, torch.tensor(1.0 / n_rows, device=device)  # SigLIP's negative bias


def assert_primitives_match_truth(ours, inputs, positive_offset, dtype=torch.float32, baseline=None):
    image, text, scale, bias, grad_coef = inputs
    truth = cuda_host.siglip_truth(image, text, scale, bias, positive_offset, grad_coef)
    if baseline is None:
        args = (image.float(), text.float(), scale, bias, positive_offset)
        baseline = run_primitives(siglip_loss_torch, *args, grad_coef)
    assert set(ours) == {"loss_sum", *BACKWARD}
    cuda_host.assert_outputs_match_truth(ours, baseline, truth, dtype)


# ---- Host build -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 37, 300])
@pytest.mark.parametrize("dim", [3, 200, 257])
@pytest.mark.parametrize("with_bias", [False, True])
def test_host_build_matches_the_fp64_truth_and_open_clip(host, batch, dim, with_bias):
    image, text, scale, bias, grad_coef = siglip_block(batch, batch, dim, seed=batch * 13 + dim)
    bias = bias if with_bias else torch.zeros(())
    inputs = (image, text, scale, bias, grad_coef)
    assert_primitives_match_truth(run_primitives(host, image, text, scale, bias, 0, grad_coef), inputs, 0)

    image, text = clip_like_features(batch, dim, seed=batch + dim + 1)
    logit_bias = BIAS if with_bias else 0.0

    def ours(image, text, scale, bias):
        return SigLipLossFunction.apply(image, text, scale.reshape(()), bias.reshape(()), cuda_host.HostBackend(host))

    result = loss_and_grads(ours, image, text, SCALE, logit_bias)
    reference = loss_and_grads(open_clip_loss(), image, text, SCALE, logit_bias)
    for name in ("loss", "image", "text", "logit_scale", "logit_bias"):
        assert_matches_reference(result[name], reference[name], name=name)


@pytest.mark.parametrize("n_rows,n_cols,dim,offset", [(70, 300, 64, 140), (70, 100, 257, -70), (37, 100, 64, 1000)])
def test_host_build_rectangular_blocks_and_positive_offsets(host, n_rows, n_cols, dim, offset):
    inputs = siglip_block(n_rows, n_cols, dim, seed=n_rows + n_cols + offset)
    image, text, scale, bias, grad_coef = inputs
    assert_primitives_match_truth(run_primitives(host, image, text, scale, bias, offset, grad_coef), inputs, offset)


def test_host_build_chunk_loop_column_splits_and_strides(host):
    """One row block per backward chunk (bias partials offset per chunk), many forward column splits, and
    rows with a stride along D give the unchunked, contiguous result."""
    image, text, scale, bias, grad_coef = siglip_block(300, 200, 64, seed=17)
    whole = run_primitives(host, image, text, scale, bias, 30, grad_coef)
    host.workspace_bytes, host.target_programs = 1, 64
    host.calls.clear()
    wide = torch.zeros(300, 128).index_copy_(1, torch.arange(0, 128, 2), image)[:, ::2]
    chunked = run_primitives(host, wide, text.t().contiguous().t(), scale, bias, 30, grad_coef)
    assert host.calls == [("siglip_loss_bwd", 3)]
    assert_primitives_match_truth(chunked, (image, text, scale, bias, grad_coef), 30)
    for name in whole:
        assert_matches_reference(chunked[name], whole[name], name=f"chunked {name}", rtol=1e-5)


def test_host_build_fp16_storage_multiplier_is_undone(host):
    image, text, scale, bias, grad_coef = siglip_block(100, 100, 64, seed=19)
    plain = run_primitives(host, image, text, scale, bias, 0, grad_coef)
    host.headroom = cuda_host.FP16_HEADROOM
    scaled = run_primitives(host, image, text, scale, bias, 0, grad_coef)
    for name in BACKWARD:
        assert_matches_reference(scaled[name], plain[name], name=name, rtol=1e-6)


def test_fake_kernels_on_fake_cuda_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastclip.ops import siglip_loss_cuda

    with FakeTensorMode():
        image = torch.empty(37, 200, device="cuda", dtype=torch.float16)
        text = torch.empty(37, 200, device="cuda", dtype=torch.float16)
        scale, bias = torch.empty((), device="cuda"), torch.empty((), device="cuda")
        loss = SigLipLossFunction.apply(image, text, scale, bias, BACKENDS["cuda"])
        assert loss.shape == () and loss.dtype == torch.float32 and loss.device.type == "cuda"
        grads = siglip_loss_cuda.siglip_loss_bwd(image, text[:20], scale, bias, 3, scale, False)
        assert [g.shape for g in grads] == [(37, 200), (20, 200), ()]
        assert all(g.dtype == torch.float32 for g in grads)


# ---- On a GPU ---------------------------------------------------------------------------------------------
@pytest.fixture
def gpu_kernels(monkeypatch):
    cuda_host.skip_without_gpu_kernels(monkeypatch)
    from fastclip.ops import siglip_loss_cuda

    return siglip_loss_cuda


def gpu_case(op, dtype, n_rows, n_cols, dim, offset, seed=0):
    inputs = siglip_block(n_rows, n_cols, dim, seed=seed or n_rows + n_cols + dim, dtype=dtype, device="cuda")
    image, text, scale, bias, grad_coef = inputs
    ours = run_primitives(op, image, text, scale, bias, offset, grad_coef)
    for value in ours.values():
        assert value.dtype == torch.float32
    baseline = {"loss_sum": siglip_loss_torch.siglip_loss_fwd(image, text, scale, bias, offset, False),
                **cuda_host.siglip_truth(image, text, scale, bias, offset, grad_coef, grad_dtype=dtype)}
    assert_primitives_match_truth(ours, inputs, offset, dtype=dtype, baseline=baseline)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,n_rows,n_cols,dim,offset", [
    (torch.float32, 37, 37, 200, 0), (torch.bfloat16, 37, 37, 257, 0), (torch.float16, 37, 37, 3, 0),
    (torch.float32, 1, 1, 3, 0), (torch.bfloat16, 70, 300, 64, 140), (torch.float32, 70, 100, 257, -70),
    (torch.float16, 300, 300, 200, 0), (torch.bfloat16, 8192, 8192, 768, 0), (torch.float16, 4096, 16384, 512, 4096),
    (torch.float32, 3001, 3001, 1280, 0)])
def test_gpu_primitives_match_the_fp64_truth(gpu_kernels, dtype, n_rows, n_cols, dim, offset):
    gpu_case(gpu_kernels, dtype, n_rows, n_cols, dim, offset)


@pytest.mark.gpu
@pytest.mark.parametrize("logit_bias", [BIAS, None])
def test_gpu_loss_matches_open_clip_in_fp32(gpu_kernels, logit_bias):
    image, text = clip_like_features(1000, 200, seed=13)
    image, text = image.cuda(), text.cuda()
    ours, reference = siglip_grads_against_open_clip(SigLipLoss(backend="cuda"), open_clip_loss(), image, text,
                                                     SCALE, logit_bias)
    names = ("loss", "image", "text", "logit_scale") + (("logit_bias",) if logit_bias is not None else ())
    for name in names:
        assert_matches_reference(ours[name], reference[name], name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_loss_is_as_accurate_as_torch_in_that_dtype(gpu_kernels, dtype):
    image, text = clip_like_features(4096, 512, dtype, seed=23)
    image, text = image.cuda(), text.cuda()
    ours = loss_and_grads(SigLipLoss(backend="cuda"), image, text, SCALE, BIAS)
    baseline = loss_and_grads(SigLipLoss(backend="torch"), image, text, SCALE, BIAS)
    truth = loss_and_grads(SigLipLoss(backend="torch"), image.double(), text.double(), SCALE, BIAS)
    assert_close_to_truth(ours["loss"], baseline["loss"], truth["loss"], dtype=dtype, kind="fwd", name="loss")
    for name in ("image", "text", "logit_scale", "logit_bias"):
        assert_close_to_truth(ours[name], baseline[name], truth[name], dtype=dtype, kind="bwd", name=f"grad {name}")


@pytest.mark.gpu
def test_gpu_deterministic_primitives_are_bitwise_repeatable(gpu_kernels, monkeypatch):
    monkeypatch.setenv("FASTCLIP_WORKSPACE_MB", "64")
    inputs = siglip_block(16384, 16384, 512, seed=33, dtype=torch.bfloat16, device="cuda")
    image, text, scale, bias, grad_coef = inputs
    first = run_primitives(gpu_kernels, image, text, scale, bias, 0, grad_coef)
    second = run_primitives(gpu_kernels, image, text, scale, bias, 0, grad_coef)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two deterministic runs"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_every_element_is_written_with_chunked_workspaces(gpu_kernels, monkeypatch, dtype):
    monkeypatch.setattr(workspace, "POISON_BUFFERS", True)
    monkeypatch.setenv("FASTCLIP_WORKSPACE_MB", "0.001")
    gpu_case(gpu_kernels, dtype, 300, 200, 200, 30, seed=43)


@pytest.mark.gpu
def test_gpu_custom_ops_pass_opcheck(gpu_kernels):
    image, text, scale, bias, grad_coef = siglip_block(37, 45, 20, seed=53, device="cuda")
    torch.library.opcheck(gpu_kernels.siglip_loss_fwd, (image, text, scale, bias, 2, False))
    torch.library.opcheck(gpu_kernels.siglip_loss_bwd, (image, text, scale, bias, 2, grad_coef, False))
