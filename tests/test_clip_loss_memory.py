"""Every byte the CLIP loss allocates in fwd+bwd, accounted on CPU at a scaled size.

The design's bound (issue 10, DESIGN.md "Memory"): extra memory <= 2 B D elt (the two gradients) +
the workspace + O(B). On CPU the profiler records each allocation and free of the CPU allocator,
so the live total at every moment is known: the ``allocate`` hook's buffers, the GEMMs' outputs and
every torch temporary. Forward and backward are bounded apart (forward: the workspace + O(B);
backward, over what the forward left alive: the gradients + the workspace + O(B)), because the
Triton interpreter keeps the last launch's arguments alive (the deterministic forward's column
partials outlive the forward here, never on a GPU). fp32 only: for 16-bit inputs the CPU path upcasts the GEMM operands and G to
fp32 (the CPU has no fast 16-bit GEMM), copies a GPU never makes; the CUDA-only out_dtype GEMMs are
not exercised here (not measured on GPU).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

from fastclip.devices import triton_interpret_mode
from fastclip.loss import ClipLoss

BATCH, DIM = 512, 64
# The interpreter's tiles are 64 x 64: 128 rows of G (fp32, n = 512) and their tile sums fill this
# workspace exactly, so a stray (B, D) fp32 transient (B D 4 = 128 KiB) cannot hide in unused slack.
INTERPRETER_BLOCK_M, INTERPRETER_BLOCK_N = 64, 64
WORKSPACE_BYTES = 128 * BATCH * 4 + 4 * (128 // INTERPRETER_BLOCK_M) * (BATCH // INTERPRETER_BLOCK_N)
PER_ROW_BYTES = 64  # the O(B) vectors: log-sum-exps, coefficients, diagonal, row partials


def phase_peaks(forward, backward) -> tuple[int, int]:
    """(peak bytes allocated by forward(), peak bytes allocated by backward() over the live total when
    it starts), from the CPU allocator's allocation and free events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        output = forward()
        with record_function("measured backward"):
            backward(output)
    events, boundary = [], []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            elif node.name == "measured backward":
                boundary.append(node.start_time_ns)
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    live, peaks, start = 0, [0, 0], None
    for time, size in sorted(events):
        if start is None and time >= boundary[0]:
            start = live  # what the forward left alive: saved tensors (and interpreter-held buffers)
        live += size
        phase = 0 if start is None else 1
        peaks[phase] = max(peaks[phase], live - (start or 0))
    return peaks[0], peaks[1]


@pytest.mark.parametrize("backend,deterministic", [("torch", False), ("triton", False), ("triton", True)])
def test_fwd_bwd_extra_memory_is_the_gradients_plus_the_workspace(monkeypatch, backend, deterministic):
    if backend == "triton" and not triton_interpret_mode():
        pytest.skip("the triton backend runs on CPU only in the interpreter (tests/conftest.py sets it)")
    monkeypatch.setenv("FASTCLIP_WORKSPACE_MB", repr(WORKSPACE_BYTES / 2**20))
    generator = torch.Generator().manual_seed(5)
    image = F.normalize(torch.randn(BATCH, DIM, generator=generator), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(BATCH, DIM, generator=generator) + image.detach(), dim=-1).requires_grad_()
    scale = torch.tensor(20.0, requires_grad=True)
    loss_fn = ClipLoss(backend=backend, deterministic=deterministic)

    def forward():
        return loss_fn(image, text, scale)

    forward().backward()  # compiles / warms up outside the measurement
    image.grad = text.grad = scale.grad = None
    forward_peak, backward_peak = phase_peaks(forward, lambda loss: loss.backward())
    gradients, per_row = 2 * BATCH * DIM * 4, PER_ROW_BYTES * BATCH
    assert forward_peak <= WORKSPACE_BYTES + per_row, (
        f"{backend}: forward peak {forward_peak} B > workspace ({WORKSPACE_BYTES}) + {PER_ROW_BYTES} B ({per_row})")
    assert backward_peak <= gradients + WORKSPACE_BYTES + per_row, (
        f"{backend}: backward peak {backward_peak} B > 2 B D 4 ({gradients}) + workspace ({WORKSPACE_BYTES})"
        f" + {PER_ROW_BYTES} B ({per_row})")
    assert backward_peak >= gradients, "the accounting missed the gradients themselves"
