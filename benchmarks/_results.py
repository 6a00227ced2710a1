"""Where benchmark results go, and how they are written: output folders, the environment stamp, CSV/JSON, plots.

Every script takes ``--out-dir DIR`` or ``--update-results`` (the committed ``benchmarks/results/``);
with neither, a run writes into its own new folder under the system temp dir (``scratch_dir()``:
``fastclip-benchmarks-<date>-<time>-<pid>``), so a quick check can neither replace a committed
result nor mix its rows into another run's files. Rows are appended to ``<dir>/<name>.csv`` (and
``.json``), each stamped with machine, versions and date; files and folders get the permissions the
user's umask gives (``fastclip.io``), like any file the user writes.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

BENCHMARKS_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS_DIR / "results"  # committed results: written only with --update-results
SCRATCH_PREFIX = "fastclip-benchmarks-"  # scratch_dir(): <temp dir>/<prefix><date>-<time>-<pid>


@functools.lru_cache(maxsize=None)
def scratch_dir() -> Path:
    """This run's own scratch folder under the temp dir (named, not created, until something is written)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / f"{SCRATCH_PREFIX}{stamp}-{os.getpid()}"


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out-dir DIR`` (default: this run's scratch_dir()) and ``--update-results`` (benchmarks/results/)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out-dir", type=Path, default=None,
                       help=f"folder for the CSV/JSON/PNG (default: a new folder {SCRATCH_PREFIX}... under "
                            f"{tempfile.gettempdir()}, one per run)")
    group.add_argument("--update-results", action="store_true",
                       help=f"append to the committed results in {RESULTS_DIR} instead of a scratch folder")


def output_dir(args: argparse.Namespace) -> Path:
    """The folder that ``add_output_arguments``' flags chose."""
    if args.update_results:
        return RESULTS_DIR
    return args.out_dir if args.out_dir is not None else scratch_dir()


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
