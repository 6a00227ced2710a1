"""One attention op for both CLIP towers, with declared backends.

``attention(query, key, value, causal=..., key_mask=..., impl=...)`` computes multi-head
scaled-dot-product attention. Plain PyTorch equivalent (the ``"math"`` backend, the test oracle)::

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))   # (B, H, L, Dh)
    scores = q @ k.transpose(-1, -2) / sqrt(Dh)                   # (B, H, Lq, Lk)
    scores = scores.masked_fill(~allowed, -inf)                   # causal: key j <= query i
    out = softmax(scores, -1) @ v                                 # (B, H, Lq, Dh) -> (B, Lq, H, Dh)

Backends (``impl``):

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``. On GPU it dispatches to the
  flash / memory-efficient kernels (O(L) memory); causal text attention uses ``is_causal`` so no
  L x L mask is ever materialised. Runs everywhere, every float dtype.
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (optional dependency, CUDA only).
- ``"math"``: the reference above (softmax in fp32); materialises the L x L scores.
- ``"auto"``: the first backend in ``AUTO_PRIORITY`` whose ``not_supported_reasons`` is empty,
  which is ``sdpa`` wherever PyTorch runs.

A backend named explicitly that cannot run raises one ``ValueError`` listing every reason and the
fix; there is no silent fallback when the user picked a backend.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastclip.devices import FLOAT_DTYPES, KERNEL_DTYPES

__all__ = ["ATTN_IMPLS", "AttentionBackend", "BACKENDS", "AUTO_PRIORITY", "attention", "resolve_backend",
           "check_attn_impl", "describe_backends", "attention_report", "Attention"]

ATTN_IMPLS = ("auto", "sdpa", "xformers", "math")


@dataclass(frozen=True)
class AttentionBackend:
    """What an attention kernel supports, and how to run it on (B, L, H, Dh) tensors."""

    name: str
    devices: tuple
    dtypes: tuple
    supports_key_mask: bool
    memory: str  # memory of the scores: "O(L)" (streamed) or "O(L^2)" (materialised)
    run: Callable
    availability: Callable[[], list]  # reasons this backend is missing from this install

    def not_supported_reasons(self, query: torch.Tensor, *, key_mask: Optional[torch.Tensor] = None) -> list:
        """Every reason this backend cannot run these inputs (empty list: it can)."""
        reasons = list(self.availability())
        if query.device.type not in self.devices:
            reasons.append(f"device {query.device.type!r} is not supported (supported: {', '.join(self.devices)})")
        if query.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(query.dtype).replace('torch.', '')} is not supported (supported: {names})")
        if key_mask is not None and not self.supports_key_mask:
            reasons.append("a per-sample key mask is not supported")
        return reasons


def _to_heads_first(*tensors):
    return [t.transpose(1, 2) for t in tensors]


def _run_math(query, key, value, causal, key_mask):
    q, k, v = _to_heads_first(query, key, value)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    allowed = None
    if causal:
        length_q, length_k = q.shape[-2], k.shape[-2]
        allowed = torch.ones(length_q, length_k, dtype=torch.bool, device=q.device).tril()
    if key_mask is not None:
        key_allowed = key_mask[:, None, None, :]
        allowed = key_allowed if allowed is None else allowed & key_allowed
    scores = scores.float()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).transpose(1, 2)


def _run_sdpa(query, key, value, causal, key_mask):
    q, k, v = _to_heads_first(query, key, value)
    mask = key_mask[:, None, None, :] if key_mask is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal).transpose(1, 2)


def _run_xformers(query, key, value, causal, key_mask):
    import xformers.ops as xops  # noqa: PLC0415 (optional dependency, imported on use)

    bias = xops.LowerTriangularMask() if causal else None
    return xops.memory_efficient_attention(query, key, value, attn_bias=bias)


def _always_available() -> list:
    return []


@functools.lru_cache(maxsize=None)
def _xformers_missing() -> tuple:
    if importlib.util.find_spec("xformers") is None:
        return ("xformers is not installed (pip install xformers, or use attn_impl='sdpa')",)
    try:
        import xformers.ops  # noqa: F401, PLC0415
    except Exception as error:  # a broken build raises all sorts of errors at import
        return (f"xformers is installed but does not import ({type(error).__name__}: {error})",)
    return ()


def _xformers_availability() -> list:
    return list(_xformers_missing())


BACKENDS = {
    "sdpa": AttentionBackend("sdpa", ("cpu", "cuda", "mps", "xpu"), FLOAT_DTYPES, True, "O(L)", _run_sdpa,
                             _always_available),
    "xformers": AttentionBackend("xformers", ("cuda",), KERNEL_DTYPES, False,
                                 "O(L)", _run_xformers, _xformers_availability),
    "math": AttentionBackend("math", ("cpu", "cuda", "mps", "xpu"), FLOAT_DTYPES, True, "O(L^2)", _run_math,
                             _always_available),
}
AUTO_PRIORITY = ("sdpa", "xformers", "math")


def check_attn_impl(impl: str) -> str:
    """Validate a name at model construction: unknown names and missing packages fail early."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={impl!r} is not one of {', '.join(map(repr, ATTN_IMPLS))}")
    if impl != "auto":
        reasons = BACKENDS[impl].availability()
        if reasons:
            raise ValueError(_cannot_run_message(impl, reasons))
    return impl


def _cannot_run_message(impl: str, reasons: list) -> str:
    lines = "\n".join(f"  - {reason}" for reason in reasons)
    return f"attn_impl={impl!r} cannot run here:\n{lines}\nUse attn_impl='auto' to pick a backend that can."


def resolve_backend(impl: str, query: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> AttentionBackend:
    """The backend that runs these inputs: the named one (or an error), or the first that fits for 'auto'."""
    if impl == "auto":
        for name in AUTO_PRIORITY:
            backend = BACKENDS[name]
            if not backend.not_supported_reasons(query, key_mask=key_mask):
                return backend
        reasons = {name: BACKENDS[name].not_supported_reasons(query, key_mask=key_mask) for name in AUTO_PRIORITY}
        raise ValueError("no attention backend can run these inputs: " + "; ".join(
            f"{name}: {', '.join(why)}" for name, why in reasons.items()))
    backend = BACKENDS.get(impl)
    if backend is None:
        raise ValueError(f"attn_impl={impl!r} is not one of {', '.join(map(repr, ATTN_IMPLS))}")
    reasons = backend.not_supported_reasons(query, key_mask=key_mask)
    if reasons:
        raise ValueError(_cannot_run_message(impl, reasons))
    return backend


def supports_key_mask(impl: str) -> bool:
    """Whether the backend behind ``impl`` takes a per-sample key mask ('auto' resolves to sdpa)."""
    return impl == "auto" or BACKENDS[impl].supports_key_mask


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool = False,
              key_mask: Optional[torch.Tensor] = None, impl: str = "auto") -> torch.Tensor:
    """Multi-head attention on ``(B, L, H, Dh)`` tensors; returns ``(B, Lq, H, Dh)``.

    query: (B, Lq, H, Dh); key, value: (B, Lk, H, Dh), all float32/float16/bfloat16, same dtype.
    causal: query i sees keys j <= i (needs Lq == Lk; no mask tensor is built for sdpa/xformers).
    key_mask: optional (B, Lk) bool, True where a key may be attended; every row needs one True.
    """
    if causal and query.shape[1] != key.shape[1]:
        raise ValueError(f"causal attention needs as many queries as keys, got {query.shape[1]} and {key.shape[1]}")
    backend = resolve_backend(impl, query, key_mask)
    return backend.run(query, key, value, causal, key_mask)


def describe_backends() -> list:
    """(name, available, reasons) for each backend in this install: what ``fastclip info`` prints."""
    rows = []
    for name in AUTO_PRIORITY:
        reasons = BACKENDS[name].availability()
        rows.append((name, not reasons, list(reasons)))
    return rows


def attention_report() -> list:
    """Lines for ``fastclip info``: each attn_impl, whether it runs here and why not."""
    lines = ["attention backends (attn_impl):"]
    for name, available, reasons in describe_backends():
        backend = BACKENDS[name]
        dtypes = ", ".join(str(d).replace("torch.", "") for d in backend.dtypes)
        status = "available" if available else "unavailable: " + "; ".join(reasons)
        lines.append(f"  {name:<8} {status}  [devices {', '.join(backend.devices)}; {dtypes}; "
                     f"scores memory {backend.memory}]")
    lines.append(f"  auto     -> first available of {', '.join(AUTO_PRIORITY)} that supports the inputs")
    return lines


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection.

    Parameter names and layout equal ``nn.MultiheadAttention``'s (``in_proj_weight`` (3D, D) with
    q, k, v stacked in that order, ``in_proj_bias`` (3D,), ``out_proj``), so OpenAI and open_clip
    weights load as they are.
    """

    def __init__(self, width: int, heads: int, attn_impl: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.width, self.heads = width, heads
        self.attn_impl = check_attn_impl(attn_impl)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's init (what OpenAI's CLIP starts its vision blocks from).
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(batch, length, 3, self.heads, -1)
        query, key, value = qkv.unbind(2)
        out = attention(query, key, value, causal=causal, impl=self.attn_impl)
        return self.out_proj(out.reshape(batch, length, width))

    def forward_rows(self, x: torch.Tensor, index: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        """The attention output at one query row per sample: x (B, L, D), index (B,) -> (B, D).

        Keys and values come from every row; with ``causal`` row ``index[b]`` sees rows ``<= index[b]``
        (a (B, L) key mask: one query row needs no L x L mask either). Equal to
        ``forward(x, causal=causal)[arange(B), index]`` at 1/L of the query and output cost.
        """
        batch, length, width = x.shape
        rows = x[torch.arange(batch, device=x.device), index]
        query = F.linear(rows, self.in_proj_weight[:width], self.in_proj_bias[:width]).view(batch, 1, self.heads, -1)
        kv = F.linear(x, self.in_proj_weight[width:], self.in_proj_bias[width:]).view(batch, length, 2, self.heads, -1)
        key, value = kv.unbind(2)
        key_mask = None
        if causal:
            key_mask = torch.arange(length, device=x.device)[None, :] <= index[:, None]
        out = attention(query, key, value, key_mask=key_mask, impl=self.attn_impl)
        return self.out_proj(out.reshape(batch, width))
