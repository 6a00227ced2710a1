"""SigLIP loss benchmark: fastclip vs open_clip's SigLipLoss, side by side, one fresh process per CPU case.

    python benchmarks/bench_siglip_loss.py                    # CPU fp32, B in 1024..16384, D=512
    python benchmarks/bench_siglip_loss.py --quick            # B in 1024, 2048 (a minute)
    python benchmarks/bench_siglip_loss.py --update-results   # append to benchmarks/results/ (committed)
    python benchmarks/bench_siglip_loss.py --device cuda --out-dir OUT   # bf16, B in 4096..65536
    pytest benchmarks/bench_siglip_loss.py --benchmark-enable # the pytest-benchmark view (small B)

Implementations (one row each per case, same inputs):
    fastclip        fastclip.loss.SigLipLoss() (backend "auto": torch on CPU, triton on sm80+; the
                    backend column says which ran)
    fastclip-torch  the same with backend="torch" (the portable chunked path; CUDA default only)
    open_clip       open_clip.loss.SigLipLoss (materialises B x B logits, labels and their log-sigmoid)
    siglip_kernel   siglip-kernel's fused_siglip_loss (PyPI siglip-kernel, fused Triton SigLIP; CUDA only),
                    called with log(logit_scale) as it takes the log temperature; its reduction is
                    open_clip's (sum / B). bash benchmarks/fetch_gpu_wheels.sh fetches its wheel
    materialised    the same formula in five lines of plain PyTorch (CUDA default only): a stand-in
                    peer where open_clip is not installed (e.g. the GPU machine); its values equal
                    open_clip's
Ratios are to open_clip, or to materialised where open_clip did not run.

Output: ``--out-dir`` (default: a scratch folder under the system temp dir, printed at the end), or
``--update-results`` for benchmarks/results/. Files: bench_siglip_loss.csv/json (rows appended) and
bench_siglip_loss_<device>.png (fwd+bwd, log axes).

Modes: fwd (forward with autograd on, as in training), bwd (backward alone), fwd+bwd. Columns:
median / p20 / p80 ms, extra peak memory over the inputs (CPU: peak RSS of the first call in a fresh
process; CUDA: max_memory_allocated, cases in one process), the loss value, and TFLOP/s counting
2·B²·D per GEMM-equivalent (fwd 1, bwd 3, fwd+bwd 4: fastclip recomputes S = s·I·Tᵀ + b in backward
and multiplies by both towers). Materialising peers whose estimated peak exceeds the machine's
memory are recorded as skipped with the estimate.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _loss_sweep; fastclip from the install / PYTHONPATH
import _loss_sweep  # noqa: E402

NAME = "bench_siglip_loss"
IMPLEMENTATIONS = ("fastclip", "fastclip-torch", "open_clip", "siglip_kernel", "materialised")
DEFAULT_IMPLEMENTATIONS = {"cpu": ("fastclip", "open_clip"), "cuda": IMPLEMENTATIONS}
MATERIALISING = ("open_clip", "materialised")
LOGIT_SCALE, LOGIT_BIAS = 10.0, -10.0  # SigLIP's initial exp(t) and b


def make_inputs(batch, dim, device, dtype, seed=0):
    """(image_features, text_features, logit_scale, logit_bias): unit rows, SigLIP's initial scale and
    bias, all requiring grad."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator(device=device).manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=-1).to(dtype)
    text = F.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=-1).to(dtype)
    scale = torch.tensor(LOGIT_SCALE, device=device, requires_grad=True)
    bias = torch.tensor(LOGIT_BIAS, device=device, requires_grad=True)
    return image.requires_grad_(), text.requires_grad_(), scale, bias


def materialised_siglip_loss(image_features, text_features, logit_scale, logit_bias):
    """open_clip's SigLipLoss for one process, written out: builds S and the labels as B x B tensors."""
    import torch
    import torch.nn.functional as F

    batch = image_features.shape[0]
    logits = logit_scale * image_features @ text_features.T + logit_bias
    labels = 2 * torch.eye(batch, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / batch


def loss_module(implementation):
    if implementation in ("fastclip", "fastclip-torch"):
        from fastclip.loss import SigLipLoss

        return SigLipLoss(backend="torch" if implementation == "fastclip-torch" else "auto")
    if implementation == "open_clip":
        from open_clip.loss import SigLipLoss

        return SigLipLoss()
    if implementation == "siglip_kernel":
        from siglip_kernel import fused_siglip_loss

        return lambda image, text, scale, bias: fused_siglip_loss(image, text, scale.log(), bias)
    return materialised_siglip_loss


def _backend_name(implementation, device, dtype) -> str:
    if implementation not in ("fastclip", "fastclip-torch"):
        return implementation
    from fastclip.backends import LossInputs, select_backend

    import torch

    requested = "torch" if implementation == "fastclip-torch" else "auto"
    return select_backend(requested, LossInputs(torch.device(device), dtype)).name


def run_case(case: dict) -> dict:
    """Time and peak memory of one (implementation, B, D, mode), in a fresh process on CPU."""
    import torch

    torch.manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    result = _loss_sweep.measure_loss_case(loss_module(case["implementation"]),
                                           lambda batch: make_inputs(batch, case["dim"], case["device"], dtype), case)
    return {**result, "backend": _backend_name(case["implementation"], case["device"], dtype)}


def skip_reason(case: dict, machine_memory: int) -> str | None:
    """open_clip / materialised hold S, the labels, y·S and its log-sigmoid: about 5 B² elements at peak."""
    if case["implementation"] == "open_clip" and importlib.util.find_spec("open_clip") is None:
        return "skipped: open_clip is not importable here (pip install open_clip_torch)"
    if case["implementation"] == "siglip_kernel":
        if not case["device"].startswith("cuda"):
            return "skipped: siglip-kernel runs on CUDA only"
        if importlib.util.find_spec("siglip_kernel") is None:
            return "skipped: siglip_kernel is not importable here (pip install siglip-kernel)"
    if case["implementation"] not in MATERIALISING:
        return None
    return _loss_sweep.materialised_memory_skip(case, machine_memory, square_tensors=5)


def build_parser():
    return _loss_sweep.loss_benchmark_parser(__doc__, implementations=IMPLEMENTATIONS,
                                             batches=[1024, 2048, 4096, 8192, 16384], quick_batches=[1024, 2048],
                                             cuda_batches=[4096, 8192, 16384, 32768, 65536])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    _loss_sweep.check_device(parser, args.device)
    implementations = args.implementations or DEFAULT_IMPLEMENTATIONS["cuda" if args.device.startswith("cuda")
                                                                      else "cpu"]
    reference = "open_clip" if importlib.util.find_spec("open_clip") else "materialised"
    _loss_sweep.run_loss_sweep(args, name=NAME, script=Path(__file__).resolve(), implementations=implementations,
                               run_case=run_case, skip_reason=skip_reason, reference=reference, title="SigLIP loss")
    return 0


# ---- pytest-benchmark view: small sizes, fastclip and open_clip in the same session -------------------------
try:
    import pytest  # noqa: F401

    test_siglip_loss_speed = _loss_sweep.loss_speed_test("siglip_loss", ("fastclip", "open_clip"), make_inputs, loss_module)
except ImportError:  # running as a script without pytest installed
    pass


if __name__ == "__main__":
    raise SystemExit(main())
