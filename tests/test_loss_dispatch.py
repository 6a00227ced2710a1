"""Backend dispatch on a mocked GPU, torch.compile over fake CUDA tensors, and the loss API's edge inputs.

No GPU is needed: ``torch.cuda.get_device_properties`` is replaced by a stub that reports a chosen
compute capability, and FakeTensorMode makes CUDA tensors that have shapes but no storage, so the
CUDA branch of dispatch (the capability query, the op lookup) runs exactly as on a GPU.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastclip import backends, devices
from fastclip.backends import LossInputs, select_backend
from fastclip.loss import ClipLoss, SigLipLoss
from fastclip.ops import gemm
from fastclip.ops.workspace import workspace_bytes

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def mocked_gpu(monkeypatch):
    """A stub GPU: set ``mocked_gpu.major/minor``; ``mocked_gpu.calls`` counts capability queries."""
    gpu = mock.Mock(major=9, minor=0, multi_processor_count=132, calls=0)

    def properties(index):
        gpu.calls += 1
        return gpu

    devices._cuda_capability.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    yield gpu
    devices._cuda_capability.cache_clear()


def _triton_installed() -> bool:
    return not backends._triton_install_reasons()


def _cuda_kernels_run_on(capability) -> bool:
    """Whether this install's CUDA C++ extension is built, and built for a GPU of that capability."""
    return not backends._cuda_install_reasons() and not backends._cuda_arch_reasons(*capability)


@pytest.mark.parametrize("capability,dtype,expected", [
    ((9, 0), torch.bfloat16, "triton"), ((8, 0), torch.float16, "triton"),
    ((7, 5), torch.float16, "cuda"),  # triton needs sm80
    ((9, 0), torch.float64, "torch")])
def test_auto_picks_by_the_mocked_capability_and_queries_it_once(mocked_gpu, capability, dtype, expected):
    if expected == "triton" and not _triton_installed():
        pytest.skip("triton is not installed")
    if expected == "cuda" and not _cuda_kernels_run_on(capability):
        expected = "torch"  # the extension is not built here (or not for sm75): nothing fused is left
    mocked_gpu.major, mocked_gpu.minor = capability
    for _ in range(3):
        assert select_backend("auto", LossInputs(CUDA0, dtype)).name == expected
    assert mocked_gpu.calls == 1, "the capability is read once per device, then cached"


def test_forced_triton_on_an_old_gpu_names_the_capability(mocked_gpu):
    mocked_gpu.major, mocked_gpu.minor = 7, 0
    with pytest.raises(ValueError, match="sm80.*sm70"):
        select_backend("triton", LossInputs(CUDA0, torch.float16))


def test_dispatch_of_a_cuda_call_compiles_with_fullgraph(mocked_gpu):
    """The CUDA branch of dispatch inside a fullgraph=True graph (no graph break, no capability in it)."""
    mocked_gpu.major = 7 if not _triton_installed() else 9

    def pick(x):
        chosen = select_backend("auto", LossInputs(CUDA0, torch.bfloat16))
        return x + (1.0 if chosen.name == "triton" else 2.0)

    expected = pick(torch.zeros(3))
    compiled = torch.compile(pick, fullgraph=True, backend="eager")(torch.zeros(3))
    assert torch.equal(compiled, expected)


@pytest.mark.skipif(not _triton_installed(), reason="triton is not installed")
def test_compiled_clip_loss_on_fake_cuda_tensors_traces_the_triton_ops(mocked_gpu):
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    loss_fn = ClipLoss()
    with FakeTensorMode(allow_non_fake_inputs=True):
        image = torch.empty(64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        text = torch.empty(64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        scale = torch.empty((), device="cuda", requires_grad=True)
        loss = torch.compile(lambda i, t, s: loss_fn(i, t, s), fullgraph=True, backend=capture)(image, text, scale)
    assert loss.device.type == "cuda" and loss.shape == ()
    code = "\n".join(module.code for graph in graphs for module in graph.modules() if hasattr(module, "code"))
    assert "clip_loss_fwd_triton" in code, "auto on an sm90 GPU traces the triton forward"


def test_cublas_fallback_keys_tell_plain_and_transposed_products_apart():
    grad_logits, text = torch.zeros(6, 10), torch.zeros(10, 4)
    image_rows = torch.zeros(6, 4)
    plain = gemm.gemm_kind(grad_logits, text)  # G @ T
    transposed = gemm.gemm_kind(grad_logits.t(), image_rows)  # G.T @ I
    assert plain != transposed
    assert gemm.gemm_kind(grad_logits.t().contiguous(), image_rows) == plain


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "lots"])
def test_bad_workspace_setting_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("FASTCLIP_WORKSPACE_MB", value)
    with pytest.raises(ValueError, match="FASTCLIP_WORKSPACE_MB.*e.g. 256"):
        workspace_bytes()
    with pytest.raises(ValueError, match="FASTCLIP_WORKSPACE_MB"):
        ClipLoss()(torch.randn(4, 8), torch.randn(4, 8), 10.0)


@pytest.mark.parametrize("loss_fn", [ClipLoss(), ClipLoss(normalize=True), SigLipLoss()], ids=["clip", "normalized",
                                                                                              "siglip"])
def test_meta_features_give_meta_loss_and_gradients(loss_fn):
    """Meta tensors (shape planning, deferred init) flow through: a meta loss and meta gradients."""
    image = torch.empty(37, 20, device="meta", requires_grad=True)
    text = torch.empty(37, 20, device="meta", requires_grad=True)
    scale = torch.empty((), device="meta", requires_grad=True)
    bias = torch.empty((), device="meta", requires_grad=True)
    extra = (bias,) if isinstance(loss_fn, SigLipLoss) else ()
    loss = loss_fn(image, text, scale, *extra)
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert image.grad.shape == image.shape and text.grad.shape == text.shape and scale.grad.shape == ()
    assert loss_fn(image, text, 14.0, *([-10.0] if extra else [])).device.type == "meta"  # a float scale too


def test_meta_features_on_a_named_gpu_backend_name_the_device():
    image = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match="got meta"):
        ClipLoss(backend="triton")(image, image, 10.0)
