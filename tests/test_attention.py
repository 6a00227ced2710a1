"""fastclip.model.attention: every attn_impl (math included) agrees with an independent dense reference
written here (fp64 as the truth, the same dtype as the error bar); declared support."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from fastclip.model.attention import BACKENDS, Attention, attention, describe_backends, resolve_backend
from tests.numerics import assert_close_to_truth

attention_module = importlib.import_module("fastclip.model.attention")
# fp32: every impl within 2e-6 abs / 1e-5 rel of the fp64 reference. fp16/bf16: judged against the fp64
# truth with the shared bars of tests/numerics.py (|impl - truth| <= K * |same-dtype reference - truth| + tol).
RUNNABLE_IMPLS = [name for name, available, _ in describe_backends() if available]


def reference_attention(query, key, value, causal=False):
    """Dense attention written independently of fastclip (einsum over (B, L, H, Dh), softmax in at least
    fp32): in fp64 the truth; in a 16-bit dtype the same-dtype baseline."""
    softmax_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bqhd,bkhd->bhqk", query, key) / query.shape[-1] ** 0.5
    if causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    weights = scores.to(softmax_dtype).softmax(dim=-1).to(value.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", weights, value)


def _qkv(batch, length_q, length_k, heads, head_dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    make = lambda length: torch.randn(batch, length, heads, head_dim, generator=generator, dtype=torch.float64)  # noqa
    return make(length_q), make(length_k), make(length_k)


@pytest.mark.parametrize("impl", RUNNABLE_IMPLS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(3, 37, 3, 24), (2, 77, 8, 64), (1, 5, 1, 8)])
def test_impls_agree_with_math_fp32(impl, causal, shape):
    batch, length, heads, head_dim = shape
    q, k, v = (t.float() for t in _qkv(batch, length, length, heads, head_dim, torch.float32, seed=length))
    expected = reference_attention(q.double(), k.double(), v.double(), causal=causal)
    result = attention(q, k, v, causal=causal, impl=impl)
    assert result.shape == (batch, length, heads, head_dim) and result.dtype == torch.float32
    torch.testing.assert_close(result.double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", RUNNABLE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_impls_low_precision_within_error_bars(impl, dtype, causal):
    q64, k64, v64 = _qkv(2, 50, 50, 4, 32, dtype, seed=7)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    truth = reference_attention(*(t.double() for t in (q, k, v)), causal=causal)  # the rounded inputs, exactly
    reference = reference_attention(q, k, v, causal=causal)
    result = attention(q, k, v, causal=causal, impl=impl)
    assert result.dtype == dtype
    assert_close_to_truth(result, reference, truth, dtype=dtype, kind="fwd", name=f"attention[{impl}]")


@pytest.mark.parametrize("impl", RUNNABLE_IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_agree_with_math_fp32(impl, causal):
    inputs = [t.float().requires_grad_() for t in _qkv(3, 23, 23, 2, 16, torch.float32, seed=3)]
    grad_out = torch.randn(3, 23, 2, 16)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(reference_attention(*inputs64, causal=causal), inputs64, grad_out.double())
    result = torch.autograd.grad(attention(*inputs, causal=causal, impl=impl), inputs, grad_out)
    for which, want, got in zip("qkv", expected, result):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{which}[{impl}]: {m}")


@pytest.mark.parametrize("impl", [i for i in RUNNABLE_IMPLS if BACKENDS[i].supports_key_mask])
def test_key_mask(impl):
    q, k, v = (t.float() for t in _qkv(4, 1, 19, 2, 8, torch.float32, seed=11))
    limit = torch.tensor([0, 5, 18, 9])
    key_mask = torch.arange(19)[None] <= limit[:, None]
    result = attention(q, k, v, key_mask=key_mask, impl=impl)
    for row in range(4):  # equal to attending the allowed keys only
        n = int(limit[row]) + 1
        expected = attention(q[row:row + 1], k[row:row + 1, :n], v[row:row + 1, :n], impl="math")
        torch.testing.assert_close(result[row:row + 1], expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_module_forward_rows_equals_full_forward_rows(causal):
    torch.manual_seed(0)
    module = Attention(48, 3)
    x = torch.randn(5, 13, 48)
    index = torch.tensor([0, 12, 3, 7, 12])
    full = module(x, causal=causal)[torch.arange(5), index]
    torch.testing.assert_close(module.forward_rows(x, index, causal=causal), full, atol=2e-6, rtol=1e-5)


def test_sdpa_causal_builds_no_mask(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    module = Attention(32, 2, attn_impl="sdpa")
    module(torch.randn(2, 9, 32), causal=True)
    assert calls and calls[0]["attn_mask"] is None and calls[0]["is_causal"] is True


def test_auto_picks_sdpa():
    q = torch.randn(1, 4, 1, 8)
    assert resolve_backend("auto", q).name == "sdpa"


def test_unknown_impl_is_a_value_error():
    with pytest.raises(ValueError, match="flash"):
        Attention(16, 2, attn_impl="flash")
    with pytest.raises(ValueError, match="not one of"):
        attention(*[torch.randn(1, 2, 1, 4)] * 3, impl="flash")


@pytest.mark.skipif("xformers" in RUNNABLE_IMPLS, reason="xformers is installed here")
def test_xformers_missing_is_a_clear_error():
    with pytest.raises(ValueError, match="xformers is not installed"):
        Attention(16, 2, attn_impl="xformers")
    import fastclip

    with pytest.raises(ValueError, match="attn_impl='xformers' cannot run here"):
        fastclip.create_model("fastclip-tiny", attn_impl="xformers")


def test_named_backend_lists_every_reason(monkeypatch):
    monkeypatch.setattr(attention_module, "_xformers_missing", lambda: ())  # pretend it is installed
    q = torch.randn(1, 3, 1, 8, dtype=torch.float64)
    with pytest.raises(ValueError) as error:
        resolve_backend("xformers", q, key_mask=torch.ones(1, 3, dtype=torch.bool))
    message = str(error.value)
    assert "device 'cpu'" in message and "float64" in message and "key mask" in message


def test_causal_needs_square_attention():
    with pytest.raises(ValueError, match="as many queries as keys"):
        attention(torch.randn(1, 2, 1, 4), torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4), causal=True)


def test_describe_backends_reports_each():
    rows = {name: (available, reasons) for name, available, reasons in describe_backends()}
    assert set(rows) == {"sdpa", "xformers", "math"}
    assert rows["sdpa"] == (True, []) and rows["math"] == (True, [])
    assert rows["xformers"][0] or rows["xformers"][1]


@pytest.mark.parametrize("impl", RUNNABLE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradients_low_precision_within_error_bars(impl, dtype):
    base = _qkv(2, 31, 31, 2, 16, dtype, seed=5)
    grad_out = torch.randn(2, 31, 2, 16, dtype=torch.float64)

    base = [t.to(dtype).double() for t in base]  # the truth sees the rounded inputs exactly

    def grads(run, cast):
        inputs = [t.to(cast).requires_grad_() for t in base]
        return torch.autograd.grad(run(*inputs), inputs, grad_out.to(cast))

    ours = lambda *inputs: attention(*inputs, causal=True, impl=impl)  # noqa: E731
    dense = lambda *inputs: reference_attention(*inputs, causal=True)  # noqa: E731
    truth, reference, result = grads(dense, torch.float64), grads(dense, dtype), grads(ours, dtype)
    for which, t, r, o in zip("qkv", truth, reference, result):
        assert_close_to_truth(o, r, t, dtype=dtype, kind="bwd", name=f"d{which}[{impl}]")
