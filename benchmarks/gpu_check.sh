#!/usr/bin/env bash
# One call on a fresh GPU machine: the Triton loss tests on CUDA (awkward shapes + @gpu real sizes),
# then the GPU loss benchmark, all within ~8 minutes. Installs nothing and needs no network: fastclip
# is imported from this source tree through a throw-away folder of symlinks (kernels/ appears as
# fastclip.kernels, as the wheel ships it). open_clip, Inf-CL, pytest, matplotlib are used when
# importable; missing ones are skipped and listed in OUT/environment.txt.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]     # default OUT_DIR: benchmarks/results/gpu_check
#
# OUT_DIR gets: environment.txt, nvidia-smi.txt, gpu_tests.log/.xml, small_shape_tests.log/.xml, bench.log,
# clip_loss_gpu.csv/json, clip_loss_gpu_D*.png, clip_loss_gpu_summary.txt (the issue's targets).
# Exit status: 0 when the tests passed (or pytest is absent, said in the log) and the benchmark ran.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$REPO/benchmarks/results/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python3}"
GPU_TESTS_TIMEOUT_S="${GPU_TESTS_TIMEOUT_S:-140}"       # @gpu tests at real sizes
SMALL_TESTS_TIMEOUT_S="${SMALL_TESTS_TIMEOUT_S:-110}"   # the CPU suite's awkward shapes, on the GPU
BENCH_BUDGET_S="${BENCH_BUDGET_S:-150}"                 # no new benchmark case starts after this
BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-200}"               # all limits: <= 7.5 min plus start-up

SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
mkdir -p "$SRC/fastclip"
for entry in "$REPO"/fastclip/* "$REPO"/fastclip/.[!.]*; do
    [ -e "$entry" ] && ln -s "$entry" "$SRC/fastclip/$(basename "$entry")"
done
ln -s "$REPO/kernels" "$SRC/fastclip/kernels"
ln -s "$REPO/tests" "$SRC/tests"
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
cd "$SRC"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$OUT/nvidia-smi.txt"
"$PYTHON" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
for name in ("triton", "pytest", "open_clip", "inf_cl", "matplotlib", "pytest_benchmark"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'importable')}")
    except Exception as error:  # noqa: BLE001 - report any import failure, never stop here
        print(f"{name}: NOT importable ({type(error).__name__}: {error}) -> skipped where needed")
import fastclip.kernels, fastclip.ops.clip_loss_triton
print("fastclip from", fastclip.__file__, "| kernels from", fastclip.kernels.__file__)
EOF
env_status=$?
cat "$OUT/environment.txt"
if [ $env_status -ne 0 ]; then
    echo "environment check failed (see above): fastclip or its Triton launchers do not import"
    exit 1
fi

# ---- CUDA C++ backend (csrc/): build fastclip._C for this GPU, then its tests ---------------------------
# Builds out of tree into a scratch folder (installs nothing) and links the library into the source view.
# CUDA_BUILD=0 skips it; limits: CUDA_BUILD_TIMEOUT_S, CUDA_TESTS_TIMEOUT_S. Logs: cuda_build.log,
# cuda_tests.log/.xml, kernel_report_cuda.csv.
CUDA_BUILD_TIMEOUT_S="${CUDA_BUILD_TIMEOUT_S:-240}"
CUDA_TESTS_TIMEOUT_S="${CUDA_TESTS_TIMEOUT_S:-150}"
cuda_status=0
if [ "${CUDA_BUILD:-1}" = "0" ]; then
    echo "CUDA_BUILD=0: the cuda backend is not built or tested" | tee "$OUT/cuda_build.log"
elif ! command -v nvcc >/dev/null 2>&1 && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    echo "no nvcc on PATH or in CUDA_HOME: the cuda backend cannot be built here (tests skip)" | tee "$OUT/cuda_build.log"
elif ! CUDA_ARCH="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"; then
    echo "no CUDA device: the cuda backend is built for the GPU it runs on, so nothing is built here" \
        | tee "$OUT/cuda_build.log"
else
    CUDA_BUILD_DIR="$(mktemp -d)"
    echo "building fastclip._C for sm ${CUDA_ARCH} (limit ${CUDA_BUILD_TIMEOUT_S} s)" | tee "$OUT/cuda_build.log"
    build_start=$(date +%s)
    (cd "$REPO" && FASTCLIP_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$CUDA_ARCH" timeout "$CUDA_BUILD_TIMEOUT_S" \
        "$PYTHON" setup.py -q build_ext --build-lib "$CUDA_BUILD_DIR/lib" --build-temp "$CUDA_BUILD_DIR/tmp") \
        >> "$OUT/cuda_build.log" 2>&1
    cuda_status=$?
    echo "build exit status $cuda_status after $(( $(date +%s) - build_start )) s" | tee -a "$OUT/cuda_build.log"
    built="$(ls "$CUDA_BUILD_DIR"/lib/fastclip/_C*.so 2>/dev/null | head -1)"
    if [ $cuda_status -eq 0 ] && [ -n "$built" ]; then
        ln -sf "$built" "$SRC/fastclip/$(basename "$built")"
        "$PYTHON" "$REPO/benchmarks/kernel_report_cuda.py" --library "$built" --out-dir "$OUT" >> "$OUT/cuda_build.log" 2>&1
        timeout "$CUDA_TESTS_TIMEOUT_S" "$PYTHON" -m pytest -q -o addopts="-ra" -p no:cacheprovider \
            -c "$REPO/pyproject.toml" --rootdir "$REPO" --junitxml "$OUT/cuda_tests.xml" \
            "$REPO/tests/test_clip_loss_cuda.py" "$REPO/tests/test_siglip_loss_cuda.py" "$REPO/tests/test_build_cuda.py" \
            2>&1 | tee "$OUT/cuda_tests.log"
        cuda_status=${PIPESTATUS[0]}
        [ "$cuda_status" -eq 124 ] && echo "cuda tests stopped at the ${CUDA_TESTS_TIMEOUT_S} s limit" | tee -a "$OUT/cuda_tests.log"
    else
        tail -20 "$OUT/cuda_build.log"
        echo "the cuda backend did not build (see cuda_build.log): its tests and benchmark rows are skipped"
    fi
fi
# ---- end of the CUDA C++ backend block -----------------------------------------------------------------

tests_status=0
run_tests() {  # $1: marker expression, $2: timeout in seconds, $3: log name
    timeout "$2" "$PYTHON" -m pytest -q -o addopts="-ra" -p no:cacheprovider -m "$1" \
        -c "$REPO/pyproject.toml" --rootdir "$REPO" --junitxml "$OUT/$3.xml" \
        "$REPO/tests/test_clip_loss_triton.py" "$REPO/tests/test_siglip_loss_triton.py" 2>&1 | tee "$OUT/$3.log"
    local status=$?
    [ $status -eq 124 ] && echo "$3 stopped at the $2 s limit" | tee -a "$OUT/$3.log"
    [ $status -ne 0 ] && tests_status=$status
}
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    # addopts from pyproject are replaced: pytest-benchmark may be absent on the GPU machine.
    # Real sizes first (the point of this run), then the awkward small shapes, now compiled for the GPU.
    run_tests "gpu" "$GPU_TESTS_TIMEOUT_S" gpu_tests
    run_tests "not gpu" "$SMALL_TESTS_TIMEOUT_S" small_shape_tests
else
    echo "pytest is not importable here: GPU tests skipped (benchmark only)" | tee "$OUT/gpu_tests.log"
fi

bench_mode=()
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: the benchmark runs as a --dry-run (CPU, Triton interpreter, tiny sizes) to check the plumbing"
    bench_mode=(--dry-run)
fi
timeout "$BENCH_TIMEOUT_S" "$PYTHON" "$REPO/benchmarks/bench_clip_loss_gpu.py" "$OUT" --modes fwd+bwd \
    --repeats 3 --budget-s "$BENCH_BUDGET_S" "${bench_mode[@]}" 2>&1 | tee "$OUT/bench.log"
bench_status=$?
[ $bench_status -eq 124 ] && echo "benchmark stopped at the ${BENCH_TIMEOUT_S}s limit" | tee -a "$OUT/bench.log"

echo "tests exit status: $tests_status, cuda backend status: $cuda_status, benchmark exit status: $bench_status; results in $OUT"
[ $tests_status -eq 0 ] && [ $bench_status -eq 0 ] && [ $cuda_status -eq 0 ]
