"""No host sync in the loss: fastclip's own code never reads a tensor's value on the host during fwd+bwd.

On a GPU, item()/float()/bool()/int()/tolist()/numpy()/cpu() on a device tensor waits for the stream
and breaks CUDA-graph capture. The Triton route runs here in the interpreter (CPU tensors), so the
test counts the calls themselves, made from a file of fastclip/ or kernels/, whatever the device.
A bad logit_scale / logit_bias tensor is therefore checked on the device (fastclip.checks.guard_scalars):
the loss and its gradients turn NaN; FASTCLIP_HOST_CHECKS=1 raises the ValueError instead.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastclip.devices import triton_interpret_mode
from fastclip import checks
from fastclip.checks import HOST_CHECK_ENV
from fastclip.loss import ClipLoss, SigLipLoss
from tests.loss_utils import clip_like_features

REPO = Path(__file__).resolve().parents[1]
OWN_CODE = (str(REPO / "fastclip") + "/", str(REPO / "kernels") + "/")
HOST_READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "numpy", "cpu")


@pytest.fixture
def host_reads(monkeypatch):
    """The (method, file:line) of every host read of a tensor that fastclip's own code makes."""
    calls = []
    monkeypatch.setattr(checks, "reads_without_sync", lambda device: False)  # every tensor a GPU's
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, __original=original, __name=name, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(OWN_CODE):
                calls.append(f"{__name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def _fwd_bwd(loss_module, with_bias: bool, backend: str):
    image, text = clip_like_features(37, 24, seed=3)
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-1.0, requires_grad=True) if with_bias else None
    loss = loss_module(backend=backend)(image, text, scale, bias)
    loss.backward()
    return loss, image.grad, text.grad, scale.grad


@pytest.mark.parametrize("loss_module,with_bias", [(ClipLoss, False), (ClipLoss, True), (SigLipLoss, True)])
def test_the_triton_route_makes_no_host_read_of_a_tensor(host_reads, loss_module, with_bias):
    if not triton_interpret_mode():
        pytest.skip("the Triton route on CPU needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    pytest.importorskip("triton")
    for _ in range(2):  # the second call: nothing cached on the first may read values either
        _fwd_bwd(loss_module, with_bias, "triton")
    assert host_reads == [], "host reads of tensors (a device sync on a GPU):\n" + "\n".join(host_reads)


def test_the_spy_sees_a_host_read(host_reads):
    """The check can fail: the old float(logit_scale) of the input checks is what it must catch."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(HOST_CHECK_ENV, "1")
        _fwd_bwd(ClipLoss, False, "torch")
    assert any("__float__" in call and "checks.py" in call for call in host_reads), host_reads


@pytest.mark.parametrize("loss_module", [ClipLoss, SigLipLoss])
@pytest.mark.parametrize("scale,bias", [(float("inf"), 0.0), (0.0, 0.0), (-2.0, 0.0), (10.0, float("nan"))])
def test_a_bad_scale_or_bias_tensor_gives_nan_not_a_number(loss_module, scale, bias, monkeypatch):
    monkeypatch.delenv(HOST_CHECK_ENV, raising=False)
    monkeypatch.setattr(checks, "reads_without_sync", lambda device: False)  # as for a GPU tensor
    image, text = clip_like_features(16, 8, seed=4)
    image.requires_grad_(True)
    logit_scale = torch.tensor(scale, requires_grad=True)
    loss = loss_module(backend="torch")(image, text, logit_scale, torch.tensor(bias))
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(image.grad).all() and torch.isnan(logit_scale.grad)


@pytest.mark.parametrize("scale,bias,match", [(float("inf"), 0.0, "finite"), (-2.0, 0.0, "exponentiated"),
                                              (10.0, float("nan"), "finite")])
@pytest.mark.parametrize("host_checks", ["1", "0"])  # "0": a CPU tensor is read on the host anyway
def test_host_checks_setting_raises_the_value_error(scale, bias, match, host_checks, monkeypatch):
    monkeypatch.setenv(HOST_CHECK_ENV, host_checks)
    image, text = clip_like_features(16, 8, seed=5)
    with pytest.raises(ValueError, match=match):
        SigLipLoss(backend="torch")(image, text, torch.tensor(scale), torch.tensor(bias))


def test_a_valid_scale_tensor_is_passed_through_with_its_gradient():
    image, text = clip_like_features(16, 8, seed=6)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    loss = ClipLoss(backend="torch")(image.double(), text.double(), scale)
    loss.backward()
    assert loss.item() == ClipLoss(backend="torch")(image.double(), text.double(), 10.0).item()
    # d loss / d scale by central differences of the float path (checked on the host, unguarded)
    step = 2.0**-8  # exact in the float path's fp32 scale; central differences: O(step^2) error
    slope = (ClipLoss(backend="torch")(image.double(), text.double(), 10.0 + step)
             - ClipLoss(backend="torch")(image.double(), text.double(), 10.0 - step)) / (2 * step)
    assert torch.allclose(scale.grad, slope, rtol=1e-4), (scale.grad, slope)
