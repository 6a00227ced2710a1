"""CLIP loss benchmark: fastclip vs open_clip's ClipLoss, side by side, one fresh process per case.

    python benchmarks/bench_clip_loss.py                 # CPU fp32, B in 4096..65536, D=512
    python benchmarks/bench_clip_loss.py --quick         # B in 1024, 2048 (a minute)
    python benchmarks/bench_clip_loss.py --device cuda   # bf16 on a GPU
    pytest benchmarks/bench_clip_loss.py --benchmark-enable   # the pytest-benchmark view (small B)

Modes: fwd (forward with autograd on, as in training), bwd (backward alone), fwd+bwd.
Columns: median / p20 / p80 ms, extra peak memory over the inputs during the first call (CPU: the
process's peak RSS, reset just before via /proc/self/clear_refs; CUDA: max_memory_allocated), and
TFLOP/s counting 2·B²·D per GEMM-equivalent (fwd 1, bwd 3, fwd+bwd 4: the 8·B²·D of the CLIP loss).
open_clip materialises B x B logits several times over; where its estimated peak exceeds the
machine's memory the case is recorded as skipped with the estimate instead of swapping the machine.
Rows go to benchmarks/results/bench_clip_loss.csv/json and plots to bench_clip_loss_<device>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")
GEMMS_PER_MODE = {"fwd": 1, "bwd": 3, "fwd+bwd": 4}
IMPLEMENTATIONS = ("fastclip", "open_clip")


def _inputs(batch, dim, device, dtype, seed=0):
    import torch
    import torch.nn.functional as F

    generator = torch.Generator(device=device).manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=-1).to(dtype)
    text = F.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=-1).to(dtype)
    return image.requires_grad_(), text.requires_grad_(), torch.tensor(14.3, device=device, requires_grad=True)


def _loss_module(implementation):
    if implementation == "fastclip":
        from fastclip.loss import ClipLoss

        return ClipLoss()
    from open_clip.loss import ClipLoss

    return ClipLoss()


def _step(loss_module, tensors, mode):
    """A callable running one case; for mode 'bwd' the forward runs outside the timed part."""
    image, text, scale = tensors

    def clear():
        for tensor in tensors:
            tensor.grad = None

    if mode == "fwd":
        return lambda: loss_module(image, text, scale)
    if mode == "fwd+bwd":
        return lambda: (clear(), loss_module(image, text, scale).backward())
    state = {}

    def prepare():
        clear()
        state["loss"] = loss_module(image, text, scale)

    def backward():
        state.pop("loss").backward()

    return prepare, backward


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    except OSError:
        pass


def _peak_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return _common.peak_rss_bytes()


def run_case(case: dict) -> dict:
    """Runs in a fresh process: time and peak memory of one (implementation, B, D, mode)."""
    import time

    import torch

    device, dtype = case["device"], getattr(torch, case["dtype"])
    torch.manual_seed(0)
    tensors = _inputs(case["batch"], case["dim"], device, dtype)
    module = _loss_module(case["implementation"])
    small = _inputs(8, case["dim"], device, dtype)  # load every lazily imported module outside the measurement
    module(*small).backward()
    del small
    step = _step(module, tensors, case["mode"])
    prepare, timed = (step if isinstance(step, tuple) else (lambda: None, step))
    repeats = case["repeats"]
    # Peak memory from the first call in this fresh process (a warm-up first would leave freed blocks
    # resident in the C allocator and hide them from the peak), then timing on warm calls.
    prepare()
    baseline = torch.cuda.memory_allocated() if device.startswith("cuda") else _common.current_rss_bytes()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    _reset_peak()
    timed()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _peak_rss()
    samples = []
    for _ in range(repeats):
        prepare()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        timed()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    median = samples[len(samples) // 2] if len(samples) % 2 else sum(samples[len(samples) // 2 - 1:][:2]) / 2
    flops = GEMMS_PER_MODE[case["mode"]] * 2 * case["batch"] ** 2 * case["dim"]
    return {**case, "status": "ok", "ms_median": median, "ms_p20": samples[int(0.2 * (len(samples) - 1))],
            "ms_p80": samples[int(round(0.8 * (len(samples) - 1)))], "tflops": flops / (median * 1e-3) / 1e12,
            "extra_peak_mb": max(0, peak - baseline) / 2**20}


def _open_clip_estimate_bytes(batch: int, element_size: int) -> int:
    """open_clip keeps two B x B logits, their log-softmax and gradients: about 6 B² elements at peak."""
    return 6 * batch * batch * element_size


def _machine_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 8192, 16384, 65536])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--largest-modes", nargs="+", default=["fwd+bwd"], choices=MODES,
                        help="modes run at the largest batch (the slowest cases)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="B in 1024, 2048 only")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    batches = [1024, 2048] if args.quick else sorted(args.batches)
    element_size = 2 if dtype in ("bfloat16", "float16") else 4
    memory = _machine_memory_bytes(args.device)
    rows = []
    for batch in batches:
        modes = args.largest_modes if batch == batches[-1] and len(batches) > 1 and not args.quick else args.modes
        for mode in modes:
            pair = {}
            for implementation in IMPLEMENTATIONS:
                case = {"op": "clip_loss", "implementation": implementation, "device": args.device, "dtype": dtype,
                        "batch": batch, "dim": args.dim, "mode": mode,
                        "repeats": 1 if batch >= 32768 else args.repeats}
                estimate = _open_clip_estimate_bytes(batch, element_size)
                if implementation == "open_clip" and estimate > 0.8 * memory:
                    result = {**case, "status": f"skipped: needs ~{estimate / 2**30:.0f} GiB, machine has "
                                                f"{memory / 2**30:.0f} GiB"}
                else:
                    result = _common.run_case_in_subprocess(Path(__file__), case)
                pair[implementation] = result
                rows.append(result)
                shown = (f"{result['ms_median']:10.1f} ms  {result['tflops']:6.3f} TFLOP/s  "
                         f"+{result['extra_peak_mb']:8.1f} MB") if result.get("status") == "ok" else result["status"]
                print(f"B={batch:6d} {mode:8s} {implementation:10s} {shown}", flush=True)
            if all(p.get("status") == "ok" for p in pair.values()):
                time_ratio = pair["fastclip"]["ms_median"] / pair["open_clip"]["ms_median"]
                memory_ratio = pair["fastclip"]["extra_peak_mb"] / max(pair["open_clip"]["extra_peak_mb"], 1e-9)
                pair["fastclip"].update(time_vs_open_clip=time_ratio, memory_vs_open_clip=memory_ratio)
                print(f"{'':26s} fastclip/open_clip: time {time_ratio:.2f}x, extra peak memory {memory_ratio:.3f}x")
    path = _common.append_results("bench_clip_loss", rows)
    ok_rows = [row for row in rows if row.get("status") == "ok" and row["mode"] == "fwd+bwd"]
    _common.plot_results(ok_rows, x="batch", series="implementation",
                         panels=[("ms_median", "fwd+bwd time (ms)"), ("extra_peak_mb", "extra peak memory (MB)")],
                         title=f"CLIP loss, D={args.dim}, {dtype}, {args.device}",
                         output=_common.RESULTS_DIR / f"bench_clip_loss_{args.device.split(':')[0]}.png")
    print(f"results: {path}")
    return 0


# ---- pytest-benchmark view: small sizes, fastclip and open_clip in the same session -------------------------
try:
    import pytest

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
    def test_clip_loss_speed(benchmark, implementation, mode):
        benchmark.group = f"clip_loss B=1024 D=512 {mode}"
        tensors = _inputs(1024, 512, "cpu", __import__("torch").float32)
        step = _step(_loss_module(implementation), tensors, mode)
        if isinstance(step, tuple):
            prepare, timed = step
            benchmark.pedantic(timed, setup=lambda: (prepare(), ((), {}))[1], rounds=5)
        else:
            benchmark(step)
except ImportError:  # running as a script without pytest installed
    pass


if __name__ == "__main__":
    raise SystemExit(main())
