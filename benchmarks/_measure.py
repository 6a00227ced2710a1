"""How the benchmarks measure: wall time (synchronised on CUDA), peak memory, and cases in fresh processes.

Peak memory: CUDA reports ``max_memory_allocated`` (reset in-process); on CPU the kernel's peak-RSS
mark (``VmHWM``, reset through ``/proc/self/clear_refs``) is honest only in a fresh process, so CPU
cases run one per child process (``run_case_in_subprocess``).
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence


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


def run_case_in_subprocess(script: Path, case: dict, timeout_s: float = 3600) -> dict:
    """Run ``python script --case JSON`` in a fresh process; it prints one JSON result line last."""
    command = [sys.executable, str(script), "--case", json.dumps(case)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr or completed.stdout)[-2000:]
        return {**case, "status": f"failed (exit {completed.returncode}): {tail.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])
