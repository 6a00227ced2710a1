"""CLIP loss benchmark: fastclip vs open_clip's ClipLoss, side by side, one fresh process per CPU case.

    python benchmarks/bench_clip_loss.py                    # CPU fp32, B in 4096..65536, D=512
    python benchmarks/bench_clip_loss.py --quick            # B in 1024, 2048 (a minute)
    python benchmarks/bench_clip_loss.py --update-results   # append to benchmarks/results/ (committed)
    python benchmarks/bench_clip_loss.py --device cuda      # bf16 on a GPU
    pytest benchmarks/bench_clip_loss.py --benchmark-enable # the pytest-benchmark view (small B)

Output: ``--out-dir`` (default: a scratch folder under the system temp dir, printed at the end), or
``--update-results`` for benchmarks/results/. Files: bench_clip_loss.csv/json (rows appended) and
bench_clip_loss_<device>.png.

Modes: fwd (forward with autograd on, as in training), bwd (backward alone), fwd+bwd.
Columns: median / p20 / p80 ms, extra peak memory over the inputs during the first call (CPU: the
peak RSS of a fresh process with glibc's mmap threshold pinned low, reset just before via
/proc/self/clear_refs, while times come from a second process; CUDA: max_memory_allocated), the
loss value, and TFLOP/s counting 2·B²·D per GEMM-equivalent (fwd 1, bwd 3, fwd+bwd 4: the 8·B²·D of
the CLIP loss). open_clip materialises B x B logits several times over; where its estimated peak
exceeds the machine's memory the case is recorded as skipped with the estimate instead of swapping.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _loss_sweep; fastclip from the install / PYTHONPATH
import _loss_sweep  # noqa: E402

NAME = "bench_clip_loss"
IMPLEMENTATIONS = ("fastclip", "open_clip")


def make_inputs(batch, dim, device, dtype, seed=0):
    """(image_features, text_features, logit_scale): unit rows and scale 14.3, all requiring grad."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator(device=device).manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=-1).to(dtype)
    text = F.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=-1).to(dtype)
    return image.requires_grad_(), text.requires_grad_(), torch.tensor(14.3, device=device, requires_grad=True)


def loss_module(implementation):
    if implementation == "fastclip":
        from fastclip.loss import ClipLoss

        return ClipLoss()
    from open_clip.loss import ClipLoss

    return ClipLoss()


def run_case(case: dict) -> dict:
    """Time and peak memory of one (implementation, B, D, mode), in a fresh process on CPU."""
    import torch

    torch.manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    return _loss_sweep.measure_loss_case(loss_module(case["implementation"]),
                                         lambda batch: make_inputs(batch, case["dim"], case["device"], dtype), case)


def skip_reason(case: dict, machine_memory: int) -> str | None:
    """open_clip keeps two B x B logits, their log-softmax and gradients: about 6 B² elements at peak."""
    if case["implementation"] != "open_clip":
        return None
    return _loss_sweep.materialised_memory_skip(case, machine_memory, square_tensors=6)


def build_parser():
    return _loss_sweep.loss_benchmark_parser(__doc__, implementations=IMPLEMENTATIONS,
                                             batches=[4096, 8192, 16384, 65536], quick_batches=[1024, 2048])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    _loss_sweep.check_device(parser, args.device)
    _loss_sweep.run_loss_sweep(args, name=NAME, script=Path(__file__).resolve(),
                               implementations=args.implementations or IMPLEMENTATIONS, run_case=run_case,
                               skip_reason=skip_reason, reference="open_clip", title="CLIP loss")
    return 0


# ---- pytest-benchmark view: small sizes, fastclip and open_clip in the same session -------------------------
try:
    import pytest  # noqa: F401

    test_clip_loss_speed = _loss_sweep.loss_speed_test("clip_loss", IMPLEMENTATIONS, make_inputs, loss_module)
except ImportError:  # running as a script without pytest installed
    pass


if __name__ == "__main__":
    raise SystemExit(main())
