"""What each compiled CUDA kernel of fastclip._C uses, per arch: registers, shared memory, local memory,
and its count of tensor-core (HMMA) and local-memory (STL/LDL, i.e. spill) instructions, read from the
built library with cuobjdump (-res-usage, -sass). No GPU needed.

    python benchmarks/kernel_report_cuda.py                    # writes to a scratch folder, prints the table
    python benchmarks/kernel_report_cuda.py --update-results   # writes benchmarks/results/kernel_report_cuda.csv
    python benchmarks/kernel_report_cuda.py --library PATH --out-dir DIR

Build the extension first: FASTCLIP_BUILD_CUDA=1 pip install --no-build-isolation -e . Rows of paths an
arch does not compile (bf16/TF32 tensor cores below sm80, the bf16 FMA fallback from sm80) are trap
stubs ("trap_only"), never launched there.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fastclip import cuda_toolkit  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "kernel_report_cuda.csv"
COLUMNS = ("arch", "kernel", "path", "expectations", "registers", "shared_bytes", "local_bytes", "stack_bytes", "hmma",
           "spill_instructions", "instructions", "trap_only")


def stamp(library: Path, tool: Path) -> dict:
    home = cuda_toolkit.find_cuda_home()
    nvcc = ".".join(map(str, cuda_toolkit.nvcc_version(home))) if home else "unknown"
    version = subprocess.run([str(tool), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "nvcc": nvcc, "cuobjdump": version[-1] if version else "unknown", "library": library.name}


def write_report(library: Path, output: Path) -> list[dict]:
    tool = cuda_toolkit.cuobjdump()
    if tool is None:
        raise SystemExit("no cuobjdump: pip install triton (it ships one) or install the CUDA toolkit")
    rows = cuda_toolkit.kernel_resources(library, tool)
    extra = stamp(library, tool)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*COLUMNS, *extra])
        writer.writeheader()
        for row in rows:
            writer.writerow({**{column: row[column] for column in COLUMNS}, **extra})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, default=None, help="the built fastclip._C (default: the installed one)")
    parser.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "fastclip_benchmarks",
                        help="folder for kernel_report_cuda.csv (default: a scratch folder)")
    parser.add_argument("--update-results", action="store_true", help=f"write {RESULTS.relative_to(REPO)}")
    args = parser.parse_args(argv)
    library = args.library or cuda_toolkit.built_extension()
    if library is None or not library.exists():
        print(f"fastclip._C is not built: {cuda_toolkit.BUILD_COMMAND}", file=sys.stderr)
        return 2
    output = RESULTS if args.update_results else args.out_dir / RESULTS.name
    rows = write_report(library, output)
    for row in rows:
        if not row["trap_only"]:
            print(f"{row['arch']:>6} {row['kernel']:<24} {row['path']:<9} {row['expectations'] or '-':<3} "
                  f"regs {row['registers']:>3}  smem {row['shared_bytes']:>6} B  local {row['local_bytes']} B  "
                  f"HMMA {row['hmma']:>3}  STL/LDL {row['spill_instructions']}")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
