"""Shared plumbing for every benchmark: environment stamp, timing, peak memory, CSV/JSON, plots.

Each ``bench_<op>.py`` file imports this module, measures its op and peers *in one run*, and appends
rows to ``benchmarks/results/<op>.csv`` (and ``.json``) stamped with machine, versions and date.
Peak memory is honest only in a fresh process, so ``run_case_in_subprocess`` runs one case per child.
"""
from __future__ import annotations

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
from typing import Callable, Iterable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_function(fn: Callable[[], object], *, device: str, warmup: int = 1, repeats: int = 5) -> dict:
    """Median and 20/80 % quantiles of wall time in milliseconds (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    quantile = lambda q: samples[min(len(samples) - 1, int(round(q * (len(samples) - 1))))]  # noqa: E731
    return {"ms_median": statistics.median(samples), "ms_p20": quantile(0.2), "ms_p80": quantile(0.8),
            "ms_min": samples[0], "repeats": repeats}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def run_case_in_subprocess(script: Path, case: dict, timeout_s: float = 3600) -> dict:
    """Run ``python script --case JSON`` in a fresh process; it prints one JSON result line last."""
    command = [sys.executable, str(script), "--case", json.dumps(case)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr or completed.stdout)[-2000:]
        return {**case, "status": f"failed (exit {completed.returncode}): {tail.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def append_results(name: str, rows: Iterable[dict], results_dir: Path = RESULTS_DIR) -> Path:
    """Append rows (stamped with environment_info) to results/<name>.csv and rewrite <name>.json."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = environment_info()
    rows = [{**row, **stamp} for row in rows]
    csv_path = results_dir / f"{name}.csv"
    json_path = results_dir / f"{name}.json"
    previous = json.loads(json_path.read_text()) if json_path.exists() else []
    all_rows = previous + rows
    fields: list[str] = []
    for row in all_rows:
        fields += [key for key in row if key not in fields]
    _atomic_write(csv_path, lambda handle: _write_csv(handle, fields, all_rows))
    _atomic_write(json_path, lambda handle: json.dump(all_rows, handle, indent=1))
    return csv_path


def _write_csv(handle, fields, rows) -> None:
    writer = csv.DictWriter(handle, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)


def _atomic_write(path: Path, write: Callable) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename: never a half-written file."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def plot_results(rows: list[dict], *, x: str, series: str, panels: list[tuple[str, str]], title: str,
                 output: Path, log_x: bool = True) -> Path | None:
    """One PNG with a panel per (column, label); one line per distinct value of ``series``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for axis, (column, label) in zip(axes[0], panels):
        for name in sorted({str(row[series]) for row in rows}):
            points = sorted((row[x], row[column]) for row in rows
                            if str(row[series]) == name and isinstance(row.get(column), (int, float)))
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        axis.set_xlabel(x)
        axis.set_ylabel(label)
        if log_x:
            axis.set_xscale("log", base=2)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
