"""The CUDA C++ CLIP loss (backend="cuda", csrc/) against an fp64 truth, the torch backend and open_clip.

Without a GPU, the kernels' own block programs and chunk loops run in the host build
(csrc/host_reference.cpp, tests/cuda_host.py): the same C++ per-tile math, chunk plans and index
arithmetic as the device path, with a one-thread block and fp32 tile products. The CLIP loss composed
from its two primitives (``PrimitiveClipLoss``: every gradient, logit_scale's included, straight from
clip_loss_bwd's three outputs) runs on it against open_clip. Checks on a GPU carry @pytest.mark.gpu.
Error bars are those of tests/numerics.py (|ours - truth| <= K * |baseline - truth| + TOL).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastclip.backends import BACKENDS, LossInputs, select_backend
from fastclip.loss import ClipLoss
from fastclip.ops import clip_loss_torch, cuda_common, workspace
from fastclip.ops.clip_loss import ClipLossFunction
from fastclip.ops.options import ClipOptions
from tests import cuda_host
from tests.cuda_host import host, host_library  # noqa: F401 (fixtures)
from tests.loss_utils import clip_like_features, grads_against_open_clip, loss_and_grads
from tests.numerics import assert_close_to_truth, assert_matches_reference

LOGIT_SCALE = 1 / 0.07
FORWARD = ("row_lse", "col_lse", "row_expect", "col_expect")
BACKWARD = ("grad_image", "grad_text", "grad_scale")


def open_clip_loss():
    return pytest.importorskip("open_clip.loss").ClipLoss()


def host_primitives(host, image, text, scale, bias, row_coef, col_coef, positive_offset) -> dict:
    outputs = dict(zip(FORWARD, host.clip_loss_fwd(image, text, scale, bias, True)))
    grads = host.clip_loss_bwd(image, text, scale, bias, outputs["row_lse"], outputs["col_lse"], row_coef, col_coef,
                               positive_offset)
    return {**outputs, **dict(zip(BACKWARD, grads))}


def torch_primitives(image, text, scale, bias, row_coef, col_coef, positive_offset) -> dict:
    """The same-dtype baseline of the error bars: the torch backend in fp32, and grad_scale as a dense fp32
    PyTorch backward forms it (sum of G * x over the materialised S, as open_clip's autograd does)."""
    outputs = dict(zip(FORWARD, clip_loss_torch.clip_loss_fwd(image, text, scale, bias, True, False)))
    grads = clip_loss_torch.clip_loss_bwd(image, text, scale, bias, outputs["row_lse"], outputs["col_lse"], row_coef,
                                          col_coef, positive_offset, False)
    dense = cuda_host.clip_truth(image, text, scale, bias, row_coef, col_coef, positive_offset,
                                 grad_dtype=torch.float32)
    return {**outputs, **dict(zip(BACKWARD[:2], grads[:2])), "grad_scale": dense["grad_scale"]}


class PrimitiveClipLoss(torch.autograd.Function):
    """open_clip's mean CLIP loss from a backend's two primitives: loss_i = (row_lse_i + col_lse_i) / 2 - S_ii,
    and d image, d text, d logit_scale from clip_loss_bwd (coefficients 1 / 2b); d logit_bias is 0 exactly."""

    @staticmethod
    def forward(ctx, op, image, text, scale, bias):
        row_lse, col_lse, _, _ = op.clip_loss_fwd(image, text, scale, bias, False, True)
        diagonal = scale * (image * text).sum(1) + bias
        ctx.op = op
        ctx.save_for_backward(image, text, scale, bias, row_lse, col_lse)
        return (0.5 * (row_lse + col_lse) - diagonal).mean()

    @staticmethod
    def backward(ctx, grad_output):
        image, text, scale, bias, row_lse, col_lse = ctx.saved_tensors
        coef = (grad_output / (2 * image.shape[0])).expand(image.shape[0])
        grad_image, grad_text, grad_scale = ctx.op.clip_loss_bwd(image, text, scale, bias, row_lse, col_lse, coef,
                                                                 coef, 0, True)
        return None, grad_image, grad_text, grad_scale.reshape(scale.shape), torch.zeros_like(bias)


def primitive_clip_loss(op, normalize=False):
    """loss(image, text, logit_scale[, logit_bias]) on ``op`` (the host build, or clip_loss_cuda on a GPU), for
    tests.loss_utils.loss_and_grads."""
    def loss(image, text, scale, bias=None):
        if normalize:
            image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        bias = torch.zeros(()) if bias is None else bias
        return PrimitiveClipLoss.apply(op, image, text, scale.reshape(()).to(image.device),
                                       bias.reshape(()).to(image.device))
    return loss


def logit_scale_errors(op, batch, dim, draws, device="cpu") -> tuple[float, float]:
    """RMS over ``draws`` of (ours, open_clip fp32) - open_clip fp64 for d loss / d logit_scale."""
    scale = float(torch.tensor(LOGIT_SCALE, dtype=torch.float32))  # one value in fp32 and fp64
    ours_errors, open_clip_errors = [], []
    for draw in range(draws):
        image, text = (f.to(device) for f in clip_like_features(batch, dim, seed=1000 + draw))
        truth = loss_and_grads(open_clip_loss(), image.double(), text.double(), scale)["logit_scale"]
        ours = loss_and_grads(primitive_clip_loss(op), image, text, scale)["logit_scale"]
        reference = loss_and_grads(open_clip_loss(), image, text, scale)["logit_scale"]
        ours_errors.append(float(ours) - float(truth))
        open_clip_errors.append(float(reference) - float(truth))
    rms = lambda errors: (sum(e * e for e in errors) / len(errors)) ** 0.5  # noqa: E731
    return rms(ours_errors), rms(open_clip_errors)


def assert_primitives_match_truth(ours, inputs, positive_offset, dtype=torch.float32, baseline=None):
    truth = cuda_host.clip_truth(*inputs, positive_offset)
    baseline = baseline or torch_primitives(*(t.float() for t in inputs), positive_offset)
    assert set(ours) == set(FORWARD + BACKWARD)
    cuda_host.assert_outputs_match_truth(ours, baseline, truth, dtype)


# ---- Host build: the shared tile math without a GPU ---------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 37, 300])
@pytest.mark.parametrize("dim", [3, 200, 257])
@pytest.mark.parametrize("with_bias", [False, True])
def test_host_build_matches_the_fp64_truth_and_open_clip(host, batch, dim, with_bias):
    inputs = cuda_host.random_block(batch, batch, dim, seed=batch * 31 + dim + with_bias, with_bias=with_bias)
    assert_primitives_match_truth(host_primitives(host, *inputs, 0), inputs, 0)

    image, text = clip_like_features(batch, dim, seed=batch + dim)
    image, text = 3 * image, 0.5 * text  # off the unit sphere, so normalize=True matters
    normalize = dim == 200
    logit_bias = -2.5 if with_bias else None
    prepare = (lambda f: F.normalize(f, dim=-1)) if normalize else (lambda f: f)
    result = loss_and_grads(primitive_clip_loss(host, normalize), image, text, LOGIT_SCALE, logit_bias)
    reference = loss_and_grads(lambda i, t, *rest: open_clip_loss()(prepare(i), prepare(t), *rest), image, text,
                               LOGIT_SCALE, logit_bias)
    assert_matches_reference(result["loss"], reference["loss"], name="loss", floor=1.0)
    for name in ("image", "text", "logit_scale"):
        assert_matches_reference(result[name], reference[name], name=f"grad {name}")
    if with_bias:
        assert_matches_reference(result["logit_bias"], reference["logit_bias"], name="grad logit_bias", floor=1.0)


@pytest.mark.parametrize("batch,dim,draws", [(300, 257, 8), (1000, 200, 3)])
def test_host_build_logit_scale_gradient_is_within_twice_open_clips_fp32_error(host, batch, dim, draws):
    """d loss / d logit_scale straight from clip_loss_bwd (sum_ij G_ij x_ij, summed beside G): its RMS error
    against open_clip in fp64, over several draws, is at most twice open_clip's own fp32 error. Mid-training
    features (pairs correlated 0.5); at a near-zero loss both errors are dominated by G's positives."""
    ours, open_clip = logit_scale_errors(host, batch, dim, draws)
    assert ours <= 2 * open_clip, f"RMS error {ours:.3e} vs open_clip's fp32 {open_clip:.3e}"


@pytest.mark.parametrize("correlated", [0.5, 1 / 1.2])
def test_host_build_logit_scale_gradient_at_scale_100_and_near_a_zero_loss(host, correlated):
    """Scale 100, softmaxes on their positives (correlated 0.5: loss ~0.5; 1/1.2: loss ~1e-5, where
    open_clip's own fp32 error is ~2%): within 2x open_clip's RMS error over 6 draws. The tile sums
    R log P + C log Q (log-softmax form); summing G x instead was 7x (loss ~0.5) and ~60x (near zero)
    open_clip's error here, the fp32 lse's ~|S| eps rounding times |S|."""
    ours_errors, open_clip_errors = [], []
    for draw in range(6):
        image, text = clip_like_features(64, 64, seed=2000 + draw, correlated=correlated)
        truth = float(loss_and_grads(open_clip_loss(), image.double(), text.double(), 100.0)["logit_scale"])
        ours = float(loss_and_grads(primitive_clip_loss(host), image, text, 100.0)["logit_scale"])
        reference = float(loss_and_grads(open_clip_loss(), image, text, 100.0)["logit_scale"])
        ours_errors.append((ours - truth) / truth)
        open_clip_errors.append((reference - truth) / truth)
    rms = lambda errors: (sum(e * e for e in errors) / len(errors)) ** 0.5  # noqa: E731
    assert rms(ours_errors) <= 2 * rms(open_clip_errors), (
        f"relative errors {ours_errors} vs open_clip's {open_clip_errors} (draw seeds 2000-2005)")


@pytest.mark.parametrize("n_rows,n_cols,dim,offset", [(70, 300, 257, 140), (300, 37, 64, -5), (37, 100, 64, 1000),
                                                     (129, 65, 33, 64)])
def test_host_build_rectangular_blocks_and_positive_offsets(host, n_rows, n_cols, dim, offset):
    """b != n blocks as the distributed layer calls them (offset = rank * b), and no positives at all."""
    inputs = cuda_host.random_block(n_rows, n_cols, dim, seed=n_rows + n_cols + offset)
    assert_primitives_match_truth(host_primitives(host, *inputs, offset), inputs, offset)


def test_host_build_chunk_loop_and_column_splits(host):
    """One row block per chunk (forward: running column state; backward: grad_text summed over chunks) and
    many column splits (row partials merged) give the unchunked result."""
    inputs = cuda_host.random_block(300, 200, 200, seed=7)
    whole = host_primitives(host, *inputs, 30)
    host.workspace_bytes, host.target_programs = 1, 64
    host.calls.clear()
    chunked = host_primitives(host, *inputs, 30)
    assert [calls for _, calls in host.calls] == [3, 3], "300 rows in 128-row chunks: 3 forward, 3 backward chunks"
    assert_primitives_match_truth(chunked, inputs, 30)
    for name in FORWARD + BACKWARD:
        assert_matches_reference(chunked[name], whole[name], name=f"chunked {name}", rtol=1e-5)
    assert torch.equal(chunked["grad_scale"], whole["grad_scale"]), "a tile's partial does not depend on the chunks"


def test_host_build_strided_inputs(host):
    """Rows with a stride along D (every other column) and transposed storage read the right elements."""
    image, text, *rest = cuda_host.random_block(37, 45, 64, seed=9)
    wide = torch.zeros(37, 128).index_copy_(1, torch.arange(0, 128, 2), image)[:, ::2]
    transposed = text.t().contiguous().t()
    assert wide.stride() == (128, 2) and transposed.stride() == (1, 45)
    assert_primitives_match_truth(host_primitives(host, wide, transposed, *rest, 0), (image, text, *rest), 0)


def test_host_build_fp16_storage_multiplier_is_undone(host):
    """The fp16 workspace's 2^8 / max|coef| multiplier and its undo leave the gradients unchanged."""
    inputs = cuda_host.random_block(100, 100, 64, seed=11)
    plain = host_primitives(host, *inputs, 0)
    host.headroom = cuda_host.FP16_HEADROOM
    scaled = host_primitives(host, *inputs, 0)
    for name in BACKWARD:
        assert_matches_reference(scaled[name], plain[name], name=name, rtol=1e-6)


def test_host_build_index_arithmetic_is_64_bit(host):
    library = host.library
    assert library.fastclip_host_element_offset(70_000, 3, 65_536, 1) == 70_000 * 65_536 + 3
    assert library.fastclip_host_element_offset(1, 2**31, 1, 2) == 2**32 + 1
    assert library.fastclip_host_row_byte_offset(2**20, 1280, 4) == 2**20 * 1280 * 4
    # B = 2^21 rows against 2^21 columns in fp16: one 128-row block (512 MiB of G) per 128 MiB workspace
    chunk = host.row_chunk(2**21, 128 * 2**21 * 2, 128 * 2**20, 65_535, 2**14 - 1)
    assert chunk == {"start": 2**21 - 128, "rows": 128, "row_blocks": 1, "first_block": 2**14 - 1, "count": 2**14}
    chunk = host.row_chunk(3_000_000_000, 64, 2**30, 65_535, 1)  # more rows than an int32 holds
    assert chunk["start"] == 65_535 * 128 and chunk["count"] == -(-3_000_000_000 // (65_535 * 128))


def test_tile_path_per_arch_sm70_sm75_sm80_sm90(host):
    """The choice the launcher makes from the kernels' arch, and which bodies each arch's device pass
    compiles (the kernels test path_compiled(__CUDA_ARCH__, path); sm70 cannot be built with CUDA 13, so
    its code paths are checked here through the same constexpr functions)."""
    paths, dtypes = cuda_host.PATHS, cuda_host.DTYPES
    choose = lambda arch, dtype, tf32=True: host.library.fastclip_host_choose_path(arch, dtypes[dtype], tf32)  # noqa: E731
    compiled = lambda arch, path: bool(host.library.fastclip_host_path_compiled(arch, paths[path]))  # noqa: E731
    for arch in (700, 750):
        assert choose(arch, torch.float16) == paths["half_mma"]
        assert choose(arch, torch.bfloat16) == paths["bf16_fma"], "no bf16 tensor cores before sm80: exact FMA"
        assert choose(arch, torch.float32) == paths["float_fma"], "no TF32 before sm80"
        assert compiled(arch, "half_mma") and compiled(arch, "bf16_fma") and compiled(arch, "float_fma")
        assert not compiled(arch, "bf16_mma") and not compiled(arch, "tf32_mma")
    for arch in (800, 860, 900, 1000):
        assert choose(arch, torch.bfloat16) == paths["bf16_mma"]
        assert choose(arch, torch.float32) == paths["tf32_mma"]
        assert choose(arch, torch.float32, False) == paths["float_fma"], "FASTCLIP_FP32_PRECISION=ieee"
        assert not compiled(arch, "bf16_fma") and compiled(arch, "tf32_mma") and compiled(arch, "bf16_mma")
    assert not any(compiled(600, path) for path in paths), "no body below sm70"
    assert [bool(host.library.fastclip_host_grad_in_fp32(paths[p])) for p in paths] == [False, False, True, True, True]


# ---- The Python side without a GPU ------------------------------------------------------------------------
def test_fake_kernels_on_fake_cuda_tensors():
    """What torch.compile's tracing sees: the forward through the autograd Function, and both custom ops'
    fake kernels (the backward itself needs a device for autograd's engine: the @gpu compile test runs it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastclip.ops import clip_loss_cuda

    with FakeTensorMode():
        image = torch.empty(37, 200, device="cuda", dtype=torch.bfloat16)
        text = torch.empty(37, 200, device="cuda", dtype=torch.bfloat16)
        scale, bias = torch.empty((), device="cuda"), torch.zeros((), device="cuda")
        loss = ClipLossFunction.apply(image, text, scale, bias, BACKENDS["cuda"], ClipOptions(normalize=True))
        assert loss.shape == () and loss.dtype == torch.float32 and loss.device.type == "cuda"
        row_lse, col_lse, row_expect, col_expect = clip_loss_cuda.clip_loss_fwd(image, text[:20], scale, bias, True,
                                                                                False)
        assert [t.shape for t in (row_lse, col_lse, row_expect, col_expect)] == [(37,), (20,), (37,), (20,)]
        grad_image, grad_text, grad_scale = clip_loss_cuda.clip_loss_bwd(image, text[:20], scale, bias, row_lse,
                                                                         col_lse, row_lse, col_lse, 3, False)
        assert grad_image.shape == (37, 200) and grad_text.shape == (20, 200) and grad_scale.shape == ()
        assert {t.dtype for t in (grad_image, grad_text, grad_scale)} == {torch.float32}


def test_named_cuda_backend_on_cpu_says_why_and_how_to_build():
    reasons = BACKENDS["cuda"].not_supported_reasons(LossInputs(torch.device("cpu"), torch.float16))
    assert any("cuda tensors" in reason for reason in reasons)
    if cuda_common.install_reasons():
        assert any("FASTCLIP_BUILD_CUDA=1 pip install" in reason for reason in reasons)
    with pytest.raises(ValueError, match="cannot run"):
        select_backend("cuda", LossInputs(torch.device("cpu"), torch.float16))


def test_arch_reasons_name_the_rebuild(monkeypatch):
    monkeypatch.setattr(cuda_common, "build_info", lambda: {"archs": [75, 80, 90], "ptx": None, "cuda": "13.0",
                                                            "torch": "2.14.1"})
    assert cuda_common.arch_reasons((7, 5)) == () and cuda_common.arch_reasons((8, 6)) == ()
    assert cuda_common.arch_reasons((9, 0)) == ()
    (reason,) = cuda_common.arch_reasons((7, 0))
    assert 'TORCH_CUDA_ARCH_LIST="7.0"' in reason and "CUDA 12" in reason
    (reason,) = cuda_common.arch_reasons((12, 0))
    assert "sm75, sm80, sm90" in reason and 'TORCH_CUDA_ARCH_LIST="12.0"' in reason
    monkeypatch.setattr(cuda_common, "build_info", lambda: {"archs": [75, 80, 90], "ptx": 90, "cuda": "13.0",
                                                            "torch": "2.14.1"})
    assert cuda_common.arch_reasons((12, 0)) == (), "PTX for sm90 JIT-compiles on newer GPUs"


def test_direct_call_without_a_gpu_raises_an_error_naming_the_fix():
    from fastclip.ops import clip_loss_cuda

    image = torch.randn(4, 8)
    zero = torch.zeros(())
    with pytest.raises(ValueError, match="CUDA device"):
        clip_loss_cuda.clip_loss_fwd(image, image, zero, zero, False, False)
    with pytest.raises(TypeError, match="backend='torch'"):
        clip_loss_cuda.clip_loss_fwd(image.double(), image.double(), zero, zero, False, False)


# ---- On a GPU ---------------------------------------------------------------------------------------------
@pytest.fixture
def gpu_kernels(monkeypatch):
    cuda_host.skip_without_gpu_kernels(monkeypatch)
    from fastclip.ops import clip_loss_cuda

    return clip_loss_cuda


def run_cuda(op, image, text, scale, bias, row_coef, col_coef, positive_offset) -> dict:
    outputs = dict(zip(FORWARD, op.clip_loss_fwd(image, text, scale, bias, True, True)))
    grads = op.clip_loss_bwd(image, text, scale, bias, outputs["row_lse"], outputs["col_lse"], row_coef, col_coef,
                             positive_offset, True)
    return {**outputs, **dict(zip(BACKWARD, grads))}


def gpu_case(op, dtype, n_rows, n_cols, dim, offset, seed=0):
    inputs = cuda_host.random_block(n_rows, n_cols, dim, seed=seed or n_rows + n_cols + dim, dtype=dtype, device="cuda")
    ours = run_cuda(op, *inputs, offset)
    forward = clip_loss_torch.clip_loss_fwd(*inputs[:4], True, False)
    baseline = {**dict(zip(FORWARD, forward)), **cuda_host.clip_truth(*inputs, offset, grad_dtype=dtype)}
    for name in FORWARD + BACKWARD:
        assert ours[name].dtype == torch.float32
    assert_primitives_match_truth(ours, inputs, offset, dtype=dtype, baseline=baseline)


GPU_CASES = [  # awkward sizes, D not a multiple of the 16-byte vector (repacked), b != n with offsets
    (torch.float32, 37, 37, 200, 0), (torch.bfloat16, 37, 37, 257, 0), (torch.float16, 37, 37, 3, 0),
    (torch.float32, 1, 1, 3, 0), (torch.bfloat16, 1, 1, 200, 0), (torch.float32, 70, 300, 257, 140),
    (torch.float16, 70, 100, 64, 1000), (torch.float32, 300, 37, 64, -5), (torch.bfloat16, 300, 300, 200, 0),
    (torch.float16, 1000, 1000, 768, 0), (torch.bfloat16, 4096, 16384, 512, 8192), (torch.float16, 8192, 8192, 1024, 0),
    (torch.float32, 3001, 3001, 1280, 0)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,n_rows,n_cols,dim,offset", GPU_CASES)
def test_gpu_primitives_match_the_fp64_truth(gpu_kernels, dtype, n_rows, n_cols, dim, offset):
    gpu_case(gpu_kernels, dtype, n_rows, n_cols, dim, offset)


@pytest.mark.gpu
@pytest.mark.parametrize("normalize,logit_bias", [(False, None), (True, -2.5)])
def test_gpu_loss_matches_open_clip_in_fp32(gpu_kernels, normalize, logit_bias):
    image, text = clip_like_features(1000, 200, seed=11 + normalize)
    image, text = (3 * image).cuda(), (0.5 * text).cuda()
    ours, reference = grads_against_open_clip(ClipLoss(backend="cuda", normalize=normalize), open_clip_loss(),
                                              image, text, LOGIT_SCALE, logit_bias, normalize)
    assert_matches_reference(ours["loss"], reference["loss"], name="loss", floor=1.0)
    for name in ("image", "text", "logit_scale"):
        assert_matches_reference(ours[name], reference[name], name=f"grad {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_loss_is_as_accurate_as_torch_in_that_dtype(gpu_kernels, dtype):
    image, text = clip_like_features(4096, 512, dtype, seed=21)
    image, text = image.cuda(), text.cuda()
    ours = loss_and_grads(ClipLoss(backend="cuda"), image, text, LOGIT_SCALE)
    baseline = loss_and_grads(ClipLoss(backend="torch"), image, text, LOGIT_SCALE)
    truth = loss_and_grads(ClipLoss(backend="torch"), image.double(), text.double(), LOGIT_SCALE)
    assert_close_to_truth(ours["loss"], baseline["loss"], truth["loss"], dtype=dtype, kind="fwd", name="loss")
    for name in ("image", "text", "logit_scale"):
        assert_close_to_truth(ours[name], baseline[name], truth[name], dtype=dtype, kind="bwd", name=f"grad {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("batch,dim,draws", [(1000, 768, 8), (8192, 512, 4)])
def test_gpu_logit_scale_gradient_is_within_twice_open_clips_fp32_error(gpu_kernels, batch, dim, draws):
    """The kernels' grad_scale (exact fp32 products) against open_clip on the GPU, as the host-build test."""
    ours, open_clip = logit_scale_errors(gpu_kernels, batch, dim, draws, device="cuda")
    assert ours <= 2 * open_clip, f"RMS error {ours:.3e} vs open_clip's fp32 {open_clip:.3e}"


@pytest.mark.gpu
def test_gpu_tf32_default_is_as_accurate_as_fp16_products(gpu_kernels, monkeypatch):
    monkeypatch.setenv("FASTCLIP_FP32_PRECISION", "tf32")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 needs sm80: fp32 runs as exact FMA here (covered by the fp32 cases)")
    inputs = cuda_host.random_block(4096, 4096, 512, seed=71, device="cuda")
    ours = run_cuda(gpu_kernels, *inputs, 0)
    truth = cuda_host.clip_truth(*inputs, 0)
    half = tuple(t.half() if t.dim() == 2 else t for t in inputs)
    baseline = cuda_host.clip_truth(*half, 0, grad_dtype=torch.float32)
    for name in ("row_lse", "col_lse", "grad_image", "grad_text"):
        kind = "bwd" if name.startswith("grad") else "fwd"
        assert_close_to_truth(ours[name], baseline[name], truth[name], dtype=torch.float16, kind=kind, name=name)


@pytest.mark.gpu
def test_gpu_deterministic_mode_is_bitwise_repeatable_at_scale(gpu_kernels, monkeypatch):
    monkeypatch.setenv("FASTCLIP_WORKSPACE_MB", "64")  # several backward chunks at B = 16384
    image, text = clip_like_features(16384, 512, torch.bfloat16, seed=31)
    image, text = image.cuda(), text.cuda()
    first = loss_and_grads(ClipLoss(backend="cuda", deterministic=True), image, text, LOGIT_SCALE)
    second = loss_and_grads(ClipLoss(backend="cuda", deterministic=True), image, text, LOGIT_SCALE)
    for name in ("loss", "image", "text", "logit_scale"):
        assert torch.equal(first[name], second[name]), f"{name} differs between two deterministic runs"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_every_element_is_written_with_chunked_workspaces(gpu_kernels, monkeypatch, dtype):
    """Outputs and workspaces start as NaN; one row block per chunk forward and backward."""
    monkeypatch.setattr(workspace, "POISON_BUFFERS", True)
    monkeypatch.setenv("FASTCLIP_WORKSPACE_MB", "0.001")
    gpu_case(gpu_kernels, dtype, 300, 200, 200, 30, seed=41)


@pytest.mark.gpu
def test_gpu_strided_inputs_are_read_correctly(gpu_kernels):
    image, text, *rest = cuda_host.random_block(300, 200, 96, seed=43, dtype=torch.float16, device="cuda")
    wide = torch.zeros(300, 192, dtype=torch.float16, device="cuda")
    wide[:, ::2] = image
    ours = run_cuda(gpu_kernels, wide[:, ::2], text.t().contiguous().t(), *rest, 0)
    contiguous = run_cuda(gpu_kernels, image, text, *rest, 0)
    for name in ours:
        assert torch.equal(ours[name], contiguous[name]), f"{name}: strided inputs give another result"


@pytest.mark.gpu
def test_gpu_custom_ops_pass_opcheck(gpu_kernels):
    image, text, scale, bias, row_coef, col_coef = cuda_host.random_block(37, 45, 20, seed=51, device="cuda")
    torch.library.opcheck(gpu_kernels.clip_loss_fwd, (image, text, scale, bias, True, False))
    row_lse, col_lse, _, _ = gpu_kernels.clip_loss_fwd(image, text, scale, bias, False, False)
    torch.library.opcheck(gpu_kernels.clip_loss_bwd,
                          (image, text, scale, bias, row_lse, col_lse, row_coef, col_coef, 3, False))


@pytest.mark.gpu
def test_gpu_compiled_model_and_loss_have_no_graph_break(gpu_kernels):
    torch.manual_seed(61)
    model = torch.nn.Linear(16, 32).cuda()
    loss_fn = ClipLoss(backend="cuda")
    step = lambda i, t, s: loss_fn(model(i), model(t), s)  # noqa: E731
    image, text = torch.randn(37, 16, device="cuda"), torch.randn(37, 16, device="cuda")
    scale = torch.tensor(LOGIT_SCALE, device="cuda", requires_grad=True)
    eager = step(image, text, scale)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(image, text, scale)
    compiled.backward()
    assert_matches_reference(compiled, eager, name="compiled loss", floor=1.0)
    assert scale.grad is not None and torch.isfinite(scale.grad)


@pytest.mark.gpu
def test_gpu_dispatch_auto_picks_cuda_on_sm7x_and_triton_on_sm80(gpu_kernels):
    inputs = LossInputs(torch.device("cuda", torch.cuda.current_device()), torch.float16)
    assert select_backend("cuda", inputs).name == "cuda", "backend='cuda' by name runs on any sm70+ GPU"
    chosen = select_backend("auto", inputs).name
    if torch.cuda.get_device_capability() < (8, 0):
        assert chosen == "cuda"
    elif not BACKENDS["triton"].not_supported_reasons(inputs):
        assert chosen == "triton"
