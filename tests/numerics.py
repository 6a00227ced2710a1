"""Error judged against a baseline, not a magic number (CCE / flash-attention style).

    |ours - fp64 truth| <= K[kind] * |torch same dtype - fp64 truth| + TOL[dtype] * max(max|truth|, floor)

``kind`` is "fwd" (loss values) or "bwd" (gradients). Backward is looser because each gradient
entry sums B softmax terms whose rounding errors add up, and ours and the baseline round in a
different order (chunked GEMMs vs one big GEMM), so per-element errors are less correlated.
TOL is relative to the quantity's own magnitude (a few units in the last place for fp32, a fraction
of one for fp16/bf16): it only covers a baseline that happens to be exact, so a 0.1 % error in a
gradient of 6e-5 fails in fp32. ``floor`` is the natural scale of a quantity whose truth may be 0.
Errors are compared as max-abs over the tensor; the failure names the worst element.
"""
from __future__ import annotations

import json
import os

import torch

K = {"fwd": 2.0, "bwd": 4.0}
TOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}

FP32_RTOL = 1e-5  # the drop-in bar: values and gradients equal open_clip's to 1e-5 relative in fp32


def assert_close_to_truth(ours: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor, *, dtype: torch.dtype,
                          kind: str, name: str, floor: float = 0.0) -> None:
    truth = truth.detach().double()
    ours_error = (ours.detach().double() - truth).abs()
    baseline_error = (baseline.detach().double() - truth).abs().max()
    # An fp32 output computed from 16-bit inputs (the primitives' statistics and gradients) is judged
    # with the fp32 floor: the inputs are exact and the arithmetic fp32, so 16-bit slack would hide bugs.
    tol = TOL[torch.float32] if ours.dtype == torch.float32 else TOL[dtype]
    bound = K[kind] * baseline_error + tol * max(float(truth.abs().max()), floor)
    worst = float(ours_error.max())
    _record_slack(name, dtype, kind, worst, float(baseline_error), float(truth.abs().max()), float(bound))
    if not worst <= float(bound):
        index = tuple(int(i) for i in torch.unravel_index(ours_error.argmax(), ours_error.shape)) if ours_error.dim() else ()
        raise AssertionError(
            f"{name} ({dtype}, {kind}): max |ours - truth| = {worst:.3e} at {index} "
            f"(ours {float(ours.detach().double().reshape(-1)[ours_error.argmax()]):.6g}, truth "
            f"{float(truth.reshape(-1)[ours_error.argmax()]):.6g}) exceeds {K[kind]} * baseline error "
            f"{float(baseline_error):.3e} + {tol:.0e} * max(max|truth|, {floor:g})")


def assert_matches_reference(ours: torch.Tensor, reference: torch.Tensor, *, name: str,
                             rtol: float = FP32_RTOL, floor: float = 1e-6) -> None:
    """Normwise relative match: max |ours - ref| <= rtol * max(max|ref|, floor).

    ``floor`` is the natural scale of the quantity, for references that are (near) zero: a loss
    of one pair is 0 exactly, and a CLIP loss's gradient w.r.t. a shared bias is 0 exactly.
    """
    ours, reference = ours.detach().double(), reference.detach().double()
    error = (ours - reference).abs()
    scale = max(float(reference.abs().max()), floor) if reference.numel() else 1.0
    worst = float(error.max()) if error.numel() else 0.0
    if not worst <= rtol * scale:
        index = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape)) if error.dim() else ()
        raise AssertionError(f"{name}: max |ours - reference| = {worst:.3e} at {index} exceeds "
                             f"{rtol:.0e} * max|reference| = {rtol * scale:.3e}")


def rms(values) -> float:
    """Root mean square of a few error measurements (of one method over several random inputs)."""
    values = [float(value) for value in values]
    return (sum(value * value for value in values) / len(values)) ** 0.5


def _record_slack(name, dtype, kind, worst, baseline_error, truth_max, bound) -> None:
    """With FASTCLIP_SLACK_LOG=<file>, append each judgement (tests/tolerance_slack.py reads them)."""
    path = os.environ.get("FASTCLIP_SLACK_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "name": name,
                                     "dtype": str(dtype).replace("torch.", ""), "kind": kind, "error": worst,
                                     "baseline_error": baseline_error, "truth_max": truth_max, "bound": bound}) + "\n")
