"""The sweep the loss benchmarks share (``bench_clip_loss``, ``bench_siglip_loss``): modes, one case, the
CPU two-process measurement, the flags, the pytest-benchmark view, and the (B, mode, implementation) loop.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Sequence

from _measure import (is_cuda, low_mmap_threshold, machine_memory_bytes, peak_memory, reset_peak_memory,
                      run_case_in_subprocess, time_function)
from _results import add_output_arguments, append_results, output_dir, plot_results

LOSS_MODES = ("fwd", "bwd", "fwd+bwd")
GEMMS_PER_MODE = {"fwd": 1, "bwd": 3, "fwd+bwd": 4}  # 2 B^2 D FLOP each: S fwd; S again, dI, dT bwd


def loss_step(loss_fn: Callable, tensors: Sequence, mode: str, last: dict) -> tuple[Callable, Callable]:
    """(prepare, timed) for one loss call in ``mode``; prepare runs untimed (the forward of 'bwd').

    ``last["loss"]`` holds the most recent loss (detached), so a row can record the value computed.
    """
    def clear():
        for tensor in tensors:
            tensor.grad = None

    def forward():
        loss = loss_fn(*tensors)
        last["loss"] = loss.detach()
        return loss

    if mode == "fwd":
        return (lambda: None), forward
    if mode == "fwd+bwd":
        return (lambda: None), (lambda: (clear(), forward().backward()))
    if mode != "bwd":
        raise ValueError(f"mode {mode!r} is not one of {LOSS_MODES}")
    state = {}

    def prepare():
        clear()
        state["loss"] = forward()

    return prepare, (lambda: state.pop("loss").backward())


def measure_loss_case(loss_fn: Callable, make_inputs: Callable[[int], Sequence], case: dict) -> dict:
    """Time and/or extra peak memory of one (implementation, B, D, mode): the body of a child process.

    make_inputs(batch) -> the loss's arguments. ``case["measure"]``: "memory", "time" or "both".
    Memory comes from the first call at size B (CPU: in a fresh process whose parent pinned a low
    mmap threshold, before any warm-up at B could leave freed blocks resident; CUDA: after a warm-up
    at B that compiles the kernels); times from warm calls.
    """
    device, mode, batch, dim = case["device"], case["mode"], case["batch"], case["dim"]
    measure = case.get("measure", "both")
    if case.get("threads"):
        import torch

        torch.set_num_threads(case["threads"])
    loss_fn(*make_inputs(8)).backward()  # lazily imported modules and first-call setup, not measured
    tensors = make_inputs(batch)
    last: dict = {}
    prepare, timed = loss_step(loss_fn, tensors, mode, last)
    result = {**case, "status": "ok"}
    if measure in ("memory", "both"):
        if is_cuda(device):
            prepare()
            timed()
        prepare()
        baseline = reset_peak_memory(device)
        timed()
        result["extra_peak_mb"] = max(0, peak_memory(device) - baseline) / 2**20
        result["memory_method"] = ("max_memory_allocated" if is_cuda(device) else
                                   f"peak RSS, MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'default')}")
    if measure in ("time", "both"):
        timing = time_function(timed, setup=prepare, device=device, warmup=int(measure == "time"),
                               repeats=case["repeats"])
        flops = GEMMS_PER_MODE[mode] * 2 * batch ** 2 * dim
        result.update(timing, tflops=flops / (timing["ms_median"] * 1e-3) / 1e12)
    return {**result, "loss": float(last["loss"])}


def measure_in_two_processes(script: Path, case: dict) -> dict:
    """CPU: extra peak memory from one fresh process (low mmap threshold, so the peak RSS tracks live
    tensors), times from another with the default allocator settings (what training runs with)."""
    with low_mmap_threshold():
        memory = run_case_in_subprocess(script, {**case, "measure": "memory"})
    if memory.get("status") != "ok":
        return memory
    timing = run_case_in_subprocess(script, {**case, "measure": "time"})
    if timing.get("status") != "ok":
        return timing
    return {**timing, "extra_peak_mb": memory["extra_peak_mb"], "memory_method": memory["memory_method"],
            "measure": "both"}


def materialised_memory_skip(case: dict, machine_memory: int, square_tensors: int) -> str | None:
    """A skip reason when a peer keeping about ``square_tensors`` B x B tensors at its peak would
    not fit in 80 % of the machine's memory (recorded instead of swapping the machine), else None."""
    estimate = square_tensors * case["batch"] ** 2 * (2 if case["dtype"] in ("bfloat16", "float16") else 4)
    if estimate > 0.8 * machine_memory:
        return f"skipped: needs ~{estimate / 2**30:.0f} GiB, machine has {machine_memory / 2**30:.0f} GiB"
    return None


def loss_speed_test(op: str, implementations: Sequence[str], make_inputs: Callable, loss_module: Callable):
    """The pytest-benchmark view of a loss benchmark: a test parametrised over implementations and modes
    at B=1024, D=512 on CPU (``test_<op>_speed = loss_speed_test(...)`` in the benchmark file)."""
    import pytest

    @pytest.mark.parametrize("mode", LOSS_MODES)
    @pytest.mark.parametrize("implementation", implementations)
    def test_speed(benchmark, implementation, mode):
        import torch

        if implementation == "open_clip":
            pytest.importorskip("open_clip")
        benchmark.group = f"{op} B=1024 D=512 {mode}"
        prepare, timed = loss_step(loss_module(implementation), make_inputs(1024, 512, "cpu", torch.float32), mode, {})
        benchmark.pedantic(timed, setup=lambda: (prepare(), ((), {}))[1], rounds=5)

    return test_speed


def loss_benchmark_parser(description: str, *, implementations: Sequence[str], batches: Sequence[int],
                          quick_batches: Sequence[int], cuda_batches: Sequence[int] | None = None
                          ) -> argparse.ArgumentParser:
    """The flags shared by the loss benchmarks (see ``run_loss_sweep``); ``batches`` is the CPU default."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help=f"batch sizes (default {' '.join(map(str, batches))}; on CUDA "
                             f"{' '.join(map(str, cuda_batches or batches))}; --quick: "
                             f"{' '.join(map(str, quick_batches))})")
    parser.add_argument("--modes", nargs="+", default=list(LOSS_MODES), choices=LOSS_MODES)
    parser.add_argument("--largest-modes", nargs="+", default=["fwd+bwd"], choices=LOSS_MODES,
                        help="modes run at the largest of several batch sizes (the slowest cases)")
    parser.add_argument("--implementations", nargs="+", default=None, choices=implementations,
                        help="default: every one that runs on --device")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads per case (0: torch's default; 1 steadies times on a "
                             "shared CPU machine, where a descheduled OpenMP thread stalls the others)")
    parser.add_argument("--quick", action="store_true", help="small batch sizes (about a minute)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    add_output_arguments(parser)
    parser.set_defaults(default_batches=list(batches), quick_batches=list(quick_batches),
                        cuda_batches=list(cuda_batches or batches))
    return parser


def _print_case(result: dict) -> None:
    shown = (f"{result['ms_median']:10.1f} ms  {result['tflops']:6.3f} TFLOP/s  +{result['extra_peak_mb']:8.1f} MB"
             if result.get("status") == "ok" else result["status"])
    print(f"B={result['batch']:6d} {result['mode']:8s} {result['implementation']:16s} {shown}", flush=True)


def add_peer_ratios(group: dict, reference: str) -> None:
    """Each ok row of ``group`` (implementation -> row) gets time and extra-memory ratios to ``reference``."""
    peer = group.get(reference)
    if peer is None or peer.get("status") != "ok":
        return
    for name, row in group.items():
        if name != reference and row.get("status") == "ok":
            row[f"time_vs_{reference}"] = row["ms_median"] / peer["ms_median"]
            # below 1 MB the peer's extra memory is allocator noise (CPU RSS): no meaningful ratio
            memory = row["extra_peak_mb"] / peer["extra_peak_mb"] if peer["extra_peak_mb"] >= 1 else None
            row[f"memory_vs_{reference}"] = memory
            print(f"{'':26s} {name}/{reference}: time {row[f'time_vs_{reference}']:.2f}x, extra peak memory "
                  + (f"{memory:.3f}x" if memory is not None else "n/a (peer < 1 MB)"))


def _run_case_in_process(run_case: Callable[[dict], dict], case: dict) -> dict:
    import gc

    import torch

    try:
        return run_case(case)
    except torch.cuda.OutOfMemoryError:
        return {**case, "status": "oom"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Exit with status 2 and the reason when ``device`` cannot run here (e.g. cuda on a CPU machine)."""
    import torch

    if is_cuda(device) and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__}, "
                     f"CUDA build {torch.version.cuda}); run on a GPU machine or use --device cpu")


def run_loss_sweep(args: argparse.Namespace, *, name: str, script: Path, implementations: Sequence[str],
                   run_case: Callable[[dict], dict], skip_reason: Callable[[dict, int], str | None],
                   reference: str, title: str) -> Path:
    """Every (B, mode, implementation) of a loss benchmark, ratios to ``reference``, CSV/JSON/PNG.

    CPU cases run in fresh processes (``measure_in_two_processes``: honest peak RSS), CUDA cases in
    this process (``max_memory_allocated`` resets per case). skip_reason(case, machine_memory) -> a reason to
    record instead of running (e.g. a materialising peer that would not fit), or None.
    """
    device = args.device
    dtype = args.dtype or ("bfloat16" if is_cuda(device) else "float32")
    defaults = args.cuda_batches if is_cuda(device) else args.default_batches
    batches = sorted(args.batches or (args.quick_batches if args.quick else defaults))
    memory = machine_memory_bytes(device)
    out = output_dir(args)
    rows = []
    for batch in batches:
        largest = batch == batches[-1] and len(batches) > 1 and not args.quick
        for mode in (args.largest_modes if largest else args.modes):
            group = {}
            for implementation in implementations:
                case = {"op": name.removeprefix("bench_"), "implementation": implementation, "device": device,
                        "dtype": dtype, "batch": batch, "dim": args.dim, "mode": mode,
                        "repeats": 1 if batch >= 32768 and not is_cuda(device) else args.repeats,
                        "threads": args.threads}
                reason = skip_reason(case, memory)
                if reason:
                    result = {**case, "status": reason}
                elif is_cuda(device):
                    result = _run_case_in_process(run_case, case)
                else:
                    result = measure_in_two_processes(script, case)
                group[implementation] = result
                rows.append(result)
                _print_case(result)
            add_peer_ratios(group, reference)
    path = append_results(name, rows, out)
    plot_results([row for row in rows if row.get("status") == "ok" and row["mode"] == "fwd+bwd"], x="batch",
                 series="implementation",
                 title=f"{title}, D={args.dim}, {dtype}, {device}" + (f", {args.threads} thread(s)" if args.threads else ""),
                 panels=[("ms_median", "fwd+bwd time (ms)"), ("extra_peak_mb", "extra peak memory (MB)")],
                 output=out / f"{name}_{device.split(':')[0]}.png")
    print(f"results: {path}")
    return path
