"""Shared plumbing for every benchmark: where results go, environment stamp, timing, peak memory,
CSV/JSON, plots, and the sweep that the loss benchmarks (``bench_clip_loss``, ``bench_siglip_loss``) share.

Where results go: every script takes ``--out-dir DIR`` (default: a scratch folder under the system
temp dir, ``SCRATCH_DIR``) or ``--update-results`` (the committed ``benchmarks/results/``). A run
never writes into the repository unless asked, so a quick check cannot replace a committed result.
Rows are appended to ``<dir>/<name>.csv`` (and ``.json``), each stamped with machine, versions, date.

Peak memory: CUDA reports ``max_memory_allocated`` (reset in-process); on CPU the kernel's peak-RSS
mark (``VmHWM``, reset through ``/proc/self/clear_refs``) is honest only in a fresh process, so CPU
cases run one per child process (``run_case_in_subprocess``).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

BENCHMARKS_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS_DIR / "results"  # committed results: written only with --update-results
SCRATCH_DIR = Path(tempfile.gettempdir()) / "fastclip-benchmarks"  # the default --out-dir


# ------------------------------------------------------------------------------------ where results go


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out-dir DIR`` (default SCRATCH_DIR) and ``--update-results`` (benchmarks/results/)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out-dir", type=Path, default=None,
                       help=f"folder for the CSV/JSON/PNG (default: the scratch folder {SCRATCH_DIR})")
    group.add_argument("--update-results", action="store_true",
                       help=f"append to the committed results in {RESULTS_DIR} instead of a scratch folder")


def output_dir(args: argparse.Namespace) -> Path:
    """The folder that ``add_output_arguments``' flags chose."""
    if args.update_results:
        return RESULTS_DIR
    return args.out_dir if args.out_dir is not None else SCRATCH_DIR


# ------------------------------------------------------------------------------------ environment


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info() -> dict:
    """Machine, versions and date: stamped on every result row."""
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "none"
    return info


# ------------------------------------------------------------------------------------ timing


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on CPU); ``device`` is a string or torch.device."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def summarize_times(samples_ms: Sequence[float]) -> dict:
    """Median, 20/80 % quantiles and minimum of wall times in milliseconds."""
    samples = sorted(samples_ms)
    quantile = lambda q: samples[min(len(samples) - 1, int(round(q * (len(samples) - 1))))]  # noqa: E731
    return {"ms_median": statistics.median(samples), "ms_p20": quantile(0.2), "ms_p80": quantile(0.8),
            "ms_min": samples[0], "repeats": len(samples)}


def time_function(fn: Callable[[], object], *, device, warmup: int = 1, repeats: int = 5,
                  setup: Callable[[], object] | None = None) -> dict:
    """``summarize_times`` of ``fn`` (synchronised on CUDA); ``setup`` runs untimed before each call."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
            synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize_times(samples)


# ------------------------------------------------------------------------------------ peak memory


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident set size since start or the last ``reset_peak_rss``."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB; not resettable


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; returns that RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
    return current_rss_bytes()


def reset_peak_memory(device) -> int:
    """Start a peak-memory measurement; returns the baseline in bytes (CUDA: allocated, CPU: RSS)."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return reset_peak_rss()


def peak_memory(device) -> int:
    """Peak bytes since ``reset_peak_memory`` (compare with its baseline)."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


@contextlib.contextmanager
def low_mmap_threshold():
    """Child processes started inside get glibc's mmap threshold pinned low, so that freed tensors
    leave the RSS at once and a peak-RSS measurement tracks live tensors (glibc otherwise keeps
    freed blocks under its adaptive threshold resident)."""
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous


def machine_memory_bytes(device) -> int:
    if is_cuda(device):
        import torch

        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ------------------------------------------------------------------------------------ processes, files


def run_case_in_subprocess(script: Path, case: dict, timeout_s: float = 3600) -> dict:
    """Run ``python script --case JSON`` in a fresh process; it prints one JSON result line last."""
    command = [sys.executable, str(script), "--case", json.dumps(case)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr or completed.stdout)[-2000:]
        return {**case, "status": f"failed (exit {completed.returncode}): {tail.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def append_results(name: str, rows: Iterable[dict], results_dir: Path) -> Path:
    """Append rows (stamped with environment_info) to <results_dir>/<name>.csv and .json, atomically.

    Earlier rows are kept as they are; ``results_dir`` is ``output_dir(args)`` (never a default, so
    no caller writes the committed results by accident).
    """
    json_path = Path(results_dir) / f"{name}.json"
    previous = json.loads(json_path.read_text()) if json_path.exists() else []
    return write_snapshot(name, previous, results_dir, stamped=list(rows))


def write_snapshot(name: str, rows: Iterable[dict], results_dir: Path, *, stamped: Sequence[dict] = ()) -> Path:
    """Write <results_dir>/<name>.csv and .json holding exactly ``rows`` plus ``stamped`` (these stamped
    with environment_info), atomically: a report that is a snapshot (e.g. kernel_report) replaces
    its previous rows instead of appending a second copy of them."""
    from fastclip.io import atomic_write, atomic_write_json  # the project's one crash-safe writer

    results_dir = Path(results_dir)
    stamp = environment_info()
    csv_path = results_dir / f"{name}.csv"
    json_path = results_dir / f"{name}.json"
    all_rows = list(rows) + [{**row, **stamp} for row in stamped]
    fields: list[str] = []
    for row in all_rows:
        fields += [key for key in row if key not in fields]
    with atomic_write(csv_path) as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(all_rows)
    atomic_write_json(json_path, all_rows)
    return csv_path


# ------------------------------------------------------------------------------------ plots


def _spans_a_decade(values: Iterable[float]) -> bool:
    positive = [value for value in values if isinstance(value, (int, float)) and value > 0]
    return bool(positive) and max(positive) >= 10 * min(positive)


def plot_results(rows: list[dict], *, x: str, series: str, panels: list[tuple[str, str]], title: str,
                 output: Path, log_x: bool | None = None, log_y: bool | None = None) -> Path | None:
    """One PNG with a panel per (column, label); one line per distinct value of ``series``.

    log_x / log_y: None (default) uses a log axis where the plotted values span a decade or more
    (batch sizes, times and memory usually do), True / False force it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for axis, (column, label) in zip(axes[0], panels):
        plotted_x, plotted_y = [], []
        for name in sorted({str(row[series]) for row in rows}):
            points = sorted((row[x], row[column]) for row in rows
                            if str(row[series]) == name and isinstance(row.get(column), (int, float)))
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
                plotted_x += [p[0] for p in points]
                plotted_y += [p[1] for p in points]
        axis.set_xlabel(x)
        axis.set_ylabel(label)
        if log_x if log_x is not None else _spans_a_decade(plotted_x):
            axis.set_xscale("log", base=2)
        if log_y if log_y is not None else _spans_a_decade(plotted_y):
            axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        if plotted_x:
            axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


# ------------------------------------------------------------------------------------ loss benchmarks

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
