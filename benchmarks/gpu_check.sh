#!/usr/bin/env bash
# One call on a fresh GPU machine, within 8 minutes: the Triton loss tests on CUDA (the @gpu real sizes,
# then the CPU suite's awkward small shapes compiled for the GPU), then the GPU loss benchmark with the
# issue's targets. Without a GPU the same script is a dry run (Triton interpreter, tiny benchmark):
# CI runs it that way, with this exact invocation, in an environment shaped like the GPU image.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]     # default OUT_DIR: benchmarks/results/gpu_check
#
# On the device tool (results come back as one archive; carry [".whl"] when the wheels were fetched):
#     bash benchmarks/gpu_check.sh /tmp/gpu_check; tar -C /tmp -czf "$OUT/gpu_check.tgz" gpu_check
#
# Needs python3 with torch, triton and pytest; no network, no install (docs/gpu.md). Steps:
#   1. the peers' wheels in .whl/ (or FASTCLIP_WHEELS), fetched beforehand by benchmarks/fetch_gpu_wheels.sh,
#      are installed --no-index one at a time into a throw-away folder on PYTHONPATH (open_clip, ftfy,
#      Inf-CL, siglip-kernel, nvtx): a wheel that fails drops only the comparisons that need it;
#   2. fastclip runs from this tree: PYTHONPATH starts with the repository, whose kernels/ folder is
#      fastclip.kernels (fastclip/__init__.py); the script stops unless both come from this tree;
#   3. OUT_DIR/environment.txt lists versions and every peer that is missing, with what that skips;
#   3b. when nvcc and a GPU are here, fastclip._C (csrc/) is built for its arch in the background;
#   4. pytest -m gpu, then -m "not gpu" (in parallel with pytest-xdist when it is there: a fresh machine
#      compiles every kernel variant cold, ~1-1.5 s each on sm90, ~60 variants), junit XML for each;
#   4b. the cuda backend's tests and benchmarks/kernel_report_cuda.py on the built library;
#   5. benchmarks/bench_clip_loss_gpu.py (D=512, B 4096..65536 on a GPU; --dry-run without one);
#   5b. on a GPU, benchmarks/bench_siglip_loss.py at D=768, B 16384 and 65536, bf16, with siglip-kernel;
#   6. the tuning stage, in what is left of the budget: benchmarks/tune_tiles.py times every declared
#      tile config of each kernel at the benchmark shapes and writes tuned_tiles_<arch>.json (the
#      fastest per kernel; `python benchmarks/tune_tiles.py --defaults FILE` prints them as defaults).
# OUT_DIR gets: environment.txt, nvidia-smi.txt, install.log, gpu_tests.log/.xml,
# small_shape_tests.log/.xml, bench.log, clip_loss_gpu.csv/json, clip_loss_gpu_D512.png,
# clip_loss_gpu_summary.txt (measured targets), bench_siglip.log, bench_siglip_loss.csv/json,
# tune.log, tuned_tiles_<arch>.json, cuda_build.log, cuda_tests.log/.xml, kernel_report_cuda.csv.
# Exit status 0 when the test runs passed, the cuda backend built (where it can) and the benchmark ran.
# Every stage has its own limit, and no stage runs past SCRIPT_BUDGET_S (470 s) in total.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$REPO/benchmarks/results/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${FASTCLIP_WHEELS:-$REPO/.whl}"
SCRIPT_BUDGET_S="${SCRIPT_BUDGET_S:-470}"               # the whole script, start-up included (< 8 min)
GPU_TESTS_TIMEOUT_S="${GPU_TESTS_TIMEOUT_S:-150}"       # @gpu tests at real sizes, cold compiles included
SMALL_TESTS_TIMEOUT_S="${SMALL_TESTS_TIMEOUT_S:-150}"   # ~60 cold compiles of ~1.5 s, serial worst case
BENCH_BUDGET_S="${BENCH_BUDGET_S:-110}"                 # no new benchmark case starts after this
BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-150}"
START_S=$SECONDS
cd "$REPO"
SCRATCH=()  # throw-away folders, removed on exit
trap 'rm -rf "${SCRATCH[@]}"' EXIT

limit() {  # the smaller of $1 and what is left of the script's budget (at least 10 s)
    local left=$((SCRIPT_BUDGET_S - (SECONDS - START_S)))
    [ "$left" -lt 10 ] && left=10
    [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

# 1. the peers' wheels, when they were brought along: one pip call per wheel, so one bad wheel only
# drops its own comparisons
: > "$OUT/install.log"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    SITE="$(mktemp -d)"
    SCRATCH+=("$SITE")
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    for wheel in "$WHEELS"/*.whl; do
        if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
                "$wheel" >> "$OUT/install.log" 2>&1; then
            echo "installed $(basename "$wheel")" | tee -a "$OUT/install.log"
        else
            echo "could not install $(basename "$wheel") (see install.log): the comparisons that need it are skipped" \
                | tee -a "$OUT/install.log"
        fi
    done
else
    echo "no wheels in $WHEELS (bash benchmarks/fetch_gpu_wheels.sh fetches them): open_clip/Inf-CL/siglip-kernel comparisons skipped" \
        | tee -a "$OUT/install.log"
fi

# 2. fastclip from this tree, kernels included, with no install: the repository leads PYTHONPATH
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" - "$REPO" <<'EOF' 2>&1 | tee -a "$OUT/install.log"
import os, sys
import fastclip, fastclip.kernels.clip_loss  # noqa: E401
tree = os.path.realpath(sys.argv[1]) + os.sep
for module in (fastclip, fastclip.kernels, fastclip.kernels.clip_loss):
    if not os.path.realpath(module.__file__).startswith(tree):
        sys.exit(f"{module.__name__} comes from {module.__file__}, not from this tree {tree}")
EOF
then
    echo "fastclip with its kernels does not import from $REPO (see above)"
    exit 1
fi

# 3. what is here, and what is skipped without it
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$OUT/nvidia-smi.txt"
"$PYTHON" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE (dry run)")
SKIPPED_WITHOUT = {
    "triton": "every Triton test and the triton benchmark rows",
    "pytest": "all tests (benchmark only)",
    "xdist": "parallel compiles of the small-shape tests (they run serially)",
    "open_clip": "the open_clip comparison tests and benchmark rows",
    "ftfy": "open_clip (it imports ftfy)",
    "inf_cl": "the Inf-CL benchmark rows",
    "siglip_kernel": "the siglip-kernel SigLIP benchmark rows",
    "nvtx": "NVTX ranges in the trainer's profiler (not used here)",
    "matplotlib": "the benchmark's PNG plot",
}
for name, skipped in SKIPPED_WITHOUT.items():
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'importable')}")
    except Exception as error:  # noqa: BLE001 - report any import failure, never stop here
        print(f"{name}: NOT importable ({type(error).__name__}: {error}) -> skipped: {skipped}")
import fastclip, fastclip.kernels, fastclip.ops.clip_loss_triton  # noqa: E401
print("fastclip from", fastclip.__file__, "| kernels from", fastclip.kernels.__file__)
EOF
env_status=$?
cat "$OUT/environment.txt"
if [ $env_status -ne 0 ]; then
    echo "environment check failed (see above): fastclip or its Triton launchers do not import"
    exit 1
fi

# 3b. the CUDA C++ backend (csrc/): fastclip._C built for this GPU's arch in the background, while the
# Triton tests run (CUDA_BUILD=0 skips it); the library is linked into fastclip/ (*.so is git-ignored).
# Logs: cuda_build.log, cuda_tests.log/.xml, kernel_report_cuda.csv.
CUDA_BUILD_TIMEOUT_S="${CUDA_BUILD_TIMEOUT_S:-240}"
CUDA_TESTS_TIMEOUT_S="${CUDA_TESTS_TIMEOUT_S:-90}"
cuda_status=0
cuda_build_pid=""
CUDA_BUILD_DIR="$(mktemp -d)"
SCRATCH+=("$CUDA_BUILD_DIR")
if [ "${CUDA_BUILD:-1}" = "0" ]; then
    echo "CUDA_BUILD=0: the cuda backend is not built or tested" | tee "$OUT/cuda_build.log"
elif ! command -v nvcc >/dev/null 2>&1 && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    echo "no nvcc on PATH or in CUDA_HOME: the cuda backend cannot be built here (its tests skip)" | tee "$OUT/cuda_build.log"
elif ! CUDA_ARCH="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"; then
    echo "no CUDA device: the cuda backend is built for the GPU it runs on, so nothing is built here" \
        | tee "$OUT/cuda_build.log"
else
    echo "building fastclip._C for sm ${CUDA_ARCH} in the background (limit ${CUDA_BUILD_TIMEOUT_S} s)" \
        | tee "$OUT/cuda_build.log"
    (FASTCLIP_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$CUDA_ARCH" timeout "$(limit "$CUDA_BUILD_TIMEOUT_S")" \
        "$PYTHON" setup.py -q build_ext --build-lib "$CUDA_BUILD_DIR/lib" --build-temp "$CUDA_BUILD_DIR/tmp") \
        >> "$OUT/cuda_build.log" 2>&1 &
    cuda_build_pid=$!
fi

# 4. the tests (pyproject's addopts are replaced: pytest-benchmark may be absent)
tests_status=0
run_tests() {  # $1: marker expression, $2: timeout in seconds, $3: log name, $4...: extra pytest options
    local expression=$1 seconds=$2 name=$3
    shift 3
    timeout "$seconds" "$PYTHON" -m pytest -q -o addopts="-ra" -p no:cacheprovider -m "$expression" \
        --junitxml "$OUT/$name.xml" "$@" tests/test_clip_loss_triton.py tests/test_siglip_loss_triton.py \
        tests/test_loss_dispatch.py 2>&1 | tee "$OUT/$name.log"
    local status=$?
    [ $status -eq 124 ] && echo "$name stopped at the $seconds s limit" | tee -a "$OUT/$name.log"
    [ $status -ne 0 ] && tests_status=$status
}
if ! "$PYTHON" -c "import pytest" 2>/dev/null; then
    echo "pytest is not importable here: tests skipped (benchmark only)" | tee "$OUT/gpu_tests.log"
    tests_status=1
else
    parallel=()
    if "$PYTHON" -c "import sys, torch, xdist; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        parallel=(-n 8)  # cold compiles are CPU-bound: 8 workers share the GPU and Triton's cache
    fi
    run_tests "gpu" "$(limit "$GPU_TESTS_TIMEOUT_S")" gpu_tests
    run_tests "not gpu" "$(limit "$SMALL_TESTS_TIMEOUT_S")" small_shape_tests "${parallel[@]}"
fi

# 4b. the CUDA C++ backend's tests and kernel report, once its build is done
if [ -n "$cuda_build_pid" ]; then
    wait "$cuda_build_pid"
    cuda_status=$?
    echo "cuda build exit status $cuda_status after $((SECONDS - START_S)) s of the script" | tee -a "$OUT/cuda_build.log"
    built="$(ls "$CUDA_BUILD_DIR"/lib/fastclip/_C*.so 2>/dev/null | head -1)"
    if [ $cuda_status -eq 0 ] && [ -n "$built" ]; then
        ln -sf "$built" "$REPO/fastclip/$(basename "$built")"
        SCRATCH+=("$REPO/fastclip/$(basename "$built")")  # the link goes with the build folder
        "$PYTHON" benchmarks/kernel_report_cuda.py --library "$built" --out-dir "$OUT" >> "$OUT/cuda_build.log" 2>&1
        timeout "$(limit "$CUDA_TESTS_TIMEOUT_S")" "$PYTHON" -m pytest -q -o addopts="-ra" -p no:cacheprovider \
            --junitxml "$OUT/cuda_tests.xml" tests/test_clip_loss_cuda.py tests/test_siglip_loss_cuda.py \
            tests/test_build_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
        cuda_status=${PIPESTATUS[0]}
        [ "$cuda_status" -eq 124 ] && echo "cuda tests stopped at their limit" | tee -a "$OUT/cuda_tests.log"
    else
        tail -20 "$OUT/cuda_build.log"
        echo "the cuda backend did not build (see cuda_build.log): its tests and benchmark rows are skipped"
    fi
fi

# 5. the benchmark
bench_mode=(--dims 512 --max-batch 65536)
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: the benchmark runs as a --dry-run (CPU, Triton interpreter, tiny sizes) to check the plumbing"
    bench_mode=(--dry-run)
fi
bench_limit="$(limit "$BENCH_TIMEOUT_S")"
bench_budget=$((bench_limit * BENCH_BUDGET_S / BENCH_TIMEOUT_S))
timeout "$bench_limit" "$PYTHON" benchmarks/bench_clip_loss_gpu.py "$OUT" --modes fwd+bwd --repeats 3 \
    --budget-s "$bench_budget" "${bench_mode[@]}" 2>&1 | tee "$OUT/bench.log"
bench_status=$?
[ $bench_status -eq 124 ] && echo "benchmark stopped at the ${bench_limit}s limit" | tee -a "$OUT/bench.log"

# 5b. the SigLIP benchmark against siglip-kernel (GPU only: its peers run on CUDA)
if [ "${bench_mode[0]}" != "--dry-run" ]; then
    timeout "$(limit "$BENCH_TIMEOUT_S")" "$PYTHON" benchmarks/bench_siglip_loss.py --device cuda --dim 768 \
        --batches 16384 65536 --modes fwd+bwd --repeats 3 --implementations fastclip siglip_kernel open_clip \
        --out-dir "$OUT" 2>&1 | tee "$OUT/bench_siglip.log"
fi

# 6. the tuning stage: every declared tile config of each kernel at the benchmark shapes, in what is
# left of the budget (the JSON is rewritten after each kernel, so a stop at the limit keeps the rest)
tune_left=$((SCRIPT_BUDGET_S - (SECONDS - START_S)))
if [ "$tune_left" -lt 30 ]; then
    echo "tuning skipped: ${tune_left} s of the budget left" | tee "$OUT/tune.log"
else
    tune_mode=()
    interpret=0
    if [ "${bench_mode[0]}" = "--dry-run" ]; then tune_mode=(--dry-run); interpret=1; fi
    TRITON_INTERPRET=$interpret timeout "$tune_left" "$PYTHON" benchmarks/tune_tiles.py "$OUT" \
        --budget-s $((tune_left - 20)) "${tune_mode[@]}" 2>&1 | tee "$OUT/tune.log"
fi

echo "tests exit status: $tests_status, cuda backend status: $cuda_status, benchmark exit status: $bench_status, $((SECONDS - START_S)) s; results in $OUT"
[ $tests_status -eq 0 ] && [ $bench_status -eq 0 ] && [ $cuda_status -eq 0 ]
