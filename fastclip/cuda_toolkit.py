"""Where the CUDA toolkit is, which GPU archs to build, and what the built kernels use.

The one place asked by setup.py (building ``fastclip._C``), CMakeLists.txt (its default arch list),
the SASS test and ``benchmarks/kernel_report_cuda.py``. Nothing here imports torch or touches a GPU,
so setup.py can load this file before fastclip is installed.

    find_cuda_home()        CUDA_HOME / CUDA_PATH, else the root of the nvcc on PATH (read from
                            ``nvcc -v --dryrun``'s TOP, so a wrapper script in /usr/local/bin works)
    supported_archs()       the archs >= sm_70 that nvcc lists (``nvcc --list-gpu-arch``)
    requested_archs(text)   TORCH_CUDA_ARCH_LIST ("7.5;8.0;9.0+PTX"), checked against the toolkit
    gencode_flags(archs)    one -gencode per arch (+ PTX where asked: the default adds it to the newest)
    max_jobs()              parallel compile jobs: MAX_JOBS, else bounded by cores and free memory
    cuobjdump()             the Triton wheel's cuobjdump, else the toolkit's
    kernel_resources(lib)   registers, shared memory, local memory, HMMA and spill instructions per kernel

Run as a script, ``--torch-arch-list`` prints that arch list for CMakeLists.txt.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MIN_ARCH = (7, 0)  # fp16 tensor cores (WMMA) from Volta
NVCC_MEMORY_GB = 1.5  # peak resident memory of one nvcc job on these kernels, measured with /usr/bin/time -v
BUILD_COMMAND = "FASTCLIP_BUILD_CUDA=1 pip install --no-build-isolation -e ."
PATH_NAMES = {0: "half_mma", 1: "bf16_mma", 2: "tf32_mma", 3: "float_fma", 4: "bf16_fma"}  # csrc/tile_math.h


class ToolkitError(ValueError):
    """A build request the local toolkit cannot serve; the message names the fix."""


@dataclass(frozen=True, order=True)
class Arch:
    major: int
    minor: int
    suffix: str = ""  # "a" / "f" for arch-specific targets such as sm_90a
    ptx: bool = False  # also embed PTX, which newer GPUs JIT-compile

    @property
    def number(self) -> str:
        return f"{self.major}{self.minor}{self.suffix}"

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}{self.suffix}{'+PTX' if self.ptx else ''}"


def _nvcc_in(cuda_home: Path) -> Path:
    return Path(cuda_home) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")


def toolkit_root(nvcc: str) -> Path | None:
    """The toolkit that ``nvcc`` really runs: its ``TOP`` (wrapper scripts exec another nvcc)."""
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe.cu"
        probe.write_text("")
        try:
            result = subprocess.run([nvcc, "-v", "--dryrun", "-c", str(probe), "-o", str(probe) + ".o"],
                                    capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", result.stdout + result.stderr, re.MULTILINE)
    if match:
        root = Path(match.group(1).strip()).resolve()
        if _nvcc_in(root).exists():
            return root
    resolved = Path(shutil.which(nvcc) or nvcc).resolve()
    return resolved.parent.parent if resolved.parent.name == "bin" else None


def find_cuda_home() -> Path | None:
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(variable)
        if value and _nvcc_in(Path(value)).exists():
            return Path(value).resolve()
    nvcc = shutil.which("nvcc")
    if nvcc:
        return toolkit_root(nvcc)
    default = Path("/usr/local/cuda")
    return default.resolve() if _nvcc_in(default).exists() else None


def nvcc_version(cuda_home: Path) -> tuple[int, int]:
    output = subprocess.run([str(_nvcc_in(cuda_home)), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", output)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def supported_archs(cuda_home: Path) -> list[Arch]:
    """The archs >= sm_70 this toolkit compiles, oldest first."""
    result = subprocess.run([str(_nvcc_in(cuda_home)), "--list-gpu-arch"], capture_output=True, text=True)
    numbers = sorted({int(n) for n in re.findall(r"compute_(\d+)\b", result.stdout)})
    if not numbers:  # nvcc older than 11.x has no --list-gpu-arch: its documented range
        numbers = [70, 72, 75, 80, 86] if nvcc_version(cuda_home) >= (11, 1) else [70, 72, 75]
    archs = [Arch(n // 10, n % 10) for n in numbers]
    return [arch for arch in archs if (arch.major, arch.minor) >= MIN_ARCH]


def requested_archs(text: str | None, supported: list[Arch], toolkit: tuple[int, int] = (0, 0)) -> list[Arch]:
    """TORCH_CUDA_ARCH_LIST parsed and checked; empty or unset means every supported arch, PTX on the newest."""
    if not text or not text.strip():
        if not supported:
            raise ToolkitError("this CUDA toolkit builds no arch >= sm_70: install CUDA 11.1 or newer")
        return [*supported[:-1], Arch(supported[-1].major, supported[-1].minor, ptx=True)]
    archs = []
    for item in re.split(r"[;,\s]+", text.strip()):
        match = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", item, re.IGNORECASE)
        if not match:
            raise ToolkitError(f"TORCH_CUDA_ARCH_LIST item {item!r} is not an arch: write e.g. \"7.0;7.5;8.0;9.0+PTX\"")
        arch = Arch(int(match.group(1)), int(match.group(2)), match.group(3).lower(), bool(match.group(4)))
        if (arch.major, arch.minor) < MIN_ARCH:
            raise ToolkitError(f"sm_{arch.number} has no tensor cores: fastclip's CUDA kernels need sm_70 (V100) or "
                               f"newer; drop {item} from TORCH_CUDA_ARCH_LIST")
        if (arch.major, arch.minor) not in {(a.major, a.minor) for a in supported}:
            listed = ", ".join(a.number for a in supported)
            if (arch.major, arch.minor) == (7, 0) and toolkit >= (13, 0):
                raise ToolkitError(
                    f"sm_70 (V100) needs a CUDA 12.x or older toolkit; this one is CUDA {toolkit[0]}.{toolkit[1]} "
                    f"(archs {listed}). Install CUDA 12.x and point CUDA_HOME at it: CUDA_HOME=/usr/local/cuda-12.8 "
                    f"TORCH_CUDA_ARCH_LIST=7.0 {BUILD_COMMAND}")
            raise ToolkitError(f"this CUDA toolkit does not build sm_{arch.number} (it builds {listed}): use a "
                               "toolkit that does (CUDA_HOME=...), or drop it from TORCH_CUDA_ARCH_LIST")
        archs.append(arch)
    return sorted(set(archs))


def gencode_flags(archs: list[Arch]) -> list[str]:
    flags = []
    for arch in archs:
        flags.append(f"-gencode=arch=compute_{arch.number},code=sm_{arch.number}")
        if arch.ptx:
            flags.append(f"-gencode=arch=compute_{arch.number},code=compute_{arch.number}")
    return flags


def ptx_arch(archs: list[Arch]) -> str:
    """The newest arch embedded as PTX (e.g. "900"), recorded in the build for ``fastclip info``."""
    with_ptx = [arch for arch in archs if arch.ptx]
    return f"{with_ptx[-1].major}{with_ptx[-1].minor}0" if with_ptx else ""


def _free_memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def max_jobs() -> int:
    """MAX_JOBS if set; else one job per core, as many as free memory holds (NVCC_MEMORY_GB each)."""
    if os.environ.get("MAX_JOBS", "").strip():
        value = os.environ["MAX_JOBS"].strip()
        if not value.isdigit() or int(value) < 1:
            raise ToolkitError(f"MAX_JOBS={value!r} must be a positive integer")
        return int(value)
    jobs = os.cpu_count() or 1
    free = _free_memory_gb()
    if free is not None:
        jobs = min(jobs, max(1, int(free / NVCC_MEMORY_GB)))
    return max(1, jobs)


def cuobjdump() -> Path | None:
    """cuobjdump from the Triton wheel (triton/backends/nvidia/bin), the toolkit, or PATH."""
    candidates = []
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "backends" / "nvidia" / "bin" / "cuobjdump")
    home = find_cuda_home()
    if home:
        candidates.append(home / "bin" / "cuobjdump")
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(Path(on_path))
    return next((path for path in candidates if path.exists()), None)


# ---- Reading the built kernels ---------------------------------------------------------------------
_KERNEL = re.compile(r"(?P<kernel>(?:clip|siglip)_loss_(?:fwd|grad)_kernel|stats_merge_kernel)"
                     r"(?:ILNS_\d+TilePathE(?P<path>\d)(?:ELb(?P<expect>[01]))?)?")


def kernel_label(mangled: str) -> dict:
    """{"kernel", "path", "expectations"} of one of fastclip's mangled kernel names."""
    match = _KERNEL.search(mangled)
    if not match:
        return {"kernel": mangled, "path": "", "expectations": ""}
    path = match.group("path")
    return {"kernel": match.group("kernel"), "path": PATH_NAMES.get(int(path), path) if path else "",
            "expectations": {"0": "no", "1": "yes"}.get(match.group("expect") or "", "")}


def _function_lines(output: str, header: str):
    """(arch, function, line) for each line under a function header of cuobjdump's output."""
    arch = function = None
    for line in output.splitlines():
        arch_match = re.match(r"\s*arch = (sm_\w+)", line)
        header_match = re.match(header, line)
        if arch_match:
            arch, function = arch_match.group(1), None
        elif header_match:
            function = header_match.group(1)
        elif function:
            yield arch, function, line


def kernel_resources(library: Path, tool: Path | None = None) -> list[dict]:
    """One row per (arch, kernel) of a built library: registers, static shared memory, local memory,
    stack, and counts of HMMA (tensor core) and STL/LDL (local memory, i.e. spill) instructions."""
    tool = tool or cuobjdump()
    if tool is None:
        raise ToolkitError("no cuobjdump: pip install triton (it ships one) or install the CUDA toolkit")
    dump = lambda option: subprocess.run([str(tool), option, str(library)], capture_output=True, text=True,  # noqa: E731
                                         check=True).stdout
    rows: dict[tuple[str, str], dict] = {}
    for arch, function, line in _function_lines(dump("-res-usage"), r"\s*Function (\S+):"):
        resources = dict(re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", line))
        if resources:
            rows[(arch, function)] = {"arch": arch, **kernel_label(function), "registers": int(resources["REG"]),
                                      "shared_bytes": int(resources.get("SHARED", 0)),
                                      "local_bytes": int(resources.get("LOCAL", 0)),
                                      "stack_bytes": int(resources.get("STACK", 0)), "hmma": 0, "spill_instructions": 0,
                                      "instructions": 0, "trap_only": False, "mangled": function}
    for arch, function, line in _function_lines(dump("-sass"), r"\s*Function : (\S+)"):
        row = rows.get((arch, function))
        opcode = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if row is None or opcode is None:
            continue
        name = opcode.group(1)
        row["instructions"] += 1
        row["hmma"] += name.startswith("HMMA")
        row["spill_instructions"] += name.startswith(("STL", "LDL"))
        row["trap_only"] |= name.startswith("BPT.TRAP")
    for row in rows.values():  # a stub for a path this arch lacks: a trap and the padding after it
        row["trap_only"] = row["trap_only"] and row["shared_bytes"] == 0 and row["hmma"] == 0
    return sorted(rows.values(), key=lambda r: (r["arch"], r["kernel"], r["path"], r["expectations"]))


def built_extension() -> Path | None:
    """The fastclip._C library of the current install, without importing it."""
    spec = importlib.util.find_spec("fastclip._C")
    return Path(spec.origin) if spec and spec.origin else None


def torch_arch_list() -> str:
    """The archs setup.py builds (TORCH_CUDA_ARCH_LIST, else every supported arch, PTX on the newest) in
    TORCH_CUDA_ARCH_LIST's own syntax, for CMakeLists.txt (torch's CMake config takes that variable)."""
    home = find_cuda_home()
    if home is None:
        raise ToolkitError("no CUDA toolkit found: set CUDA_HOME")
    archs = requested_archs(os.environ.get("TORCH_CUDA_ARCH_LIST"), supported_archs(home), nvcc_version(home))
    return ";".join(str(arch) for arch in archs)


if __name__ == "__main__":
    if sys.argv[1:] == ["--torch-arch-list"]:
        try:
            print(torch_arch_list(), end="")
        except ToolkitError as error:
            print(error, file=sys.stderr)
            raise SystemExit(2)
    else:
        print(__doc__)
