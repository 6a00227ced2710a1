#!/usr/bin/env bash
# The oldest supported stack, tested: torch 2.11 + triton 3.6 + numpy >= 2.4 (the lent GPU image's
# versions) in a Python 3.11 virtual environment, with fastclip from this tree on PYTHONPATH (no
# install, as benchmarks/gpu_check.sh runs it). Runs the Triton interpreter tests and the offline
# sm80/sm90 compile of the kernels' defaults (tests/test_kernel_report.py).
#
#     bash benchmarks/oldest_stack_check.sh [VENV_DIR]     # default VENV_DIR: /tmp/fastclip-oldest-stack
#
# Needs network to PyPI the first time (torch 2.11's CUDA wheel pulls its nvidia-* libraries, ~4.7 GB
# installed: importing torch loads cuDNN, cuBLAS, NCCL, ... even on a CPU), python3.11 on PATH (or
# PYTHON), and ~6 GB of disk. A second run reuses the environment. Not part of CI (.ci/run): the
# download and the interpreter tests take longer than CI's budget allows; run it when the range moves.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/tmp/fastclip-oldest-stack}"
PYTHON="${PYTHON:-python3.11}"
PINS=(torch==2.11.0 triton==3.6.0 "numpy>=2.4" torchvision==0.26.0)
# fastclip's own dependencies (setup.py) and the tests' (pytest; open_clip is a reference some tests use)
DEPENDENCIES=(pillow ftfy regex safetensors tqdm pytest hypothesis "open_clip_torch==3.3.0")

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q "${PINS[@]}" "${DEPENDENCIES[@]}"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/python" - "$REPO" <<'EOF'
import os, platform, sys
import numpy, torch, triton
import fastclip, fastclip.kernels  # noqa: E401
print(f"python {platform.python_version()} | torch {torch.__version__} | triton {triton.__version__} | numpy {numpy.__version__}")
print("fastclip from", fastclip.__file__, "| kernels from", fastclip.kernels.__file__)
repo = os.path.realpath(sys.argv[1]) + os.sep
for module in (fastclip, fastclip.kernels):
    if not os.path.realpath(module.__file__).startswith(repo):
        sys.exit(f"{module.__name__} does not come from {repo}")
EOF
start=$SECONDS
"$VENV/bin/python" -m pytest -q -o addopts="-ra" -p no:cacheprovider tests/test_clip_loss_triton.py \
    tests/test_siglip_loss_triton.py tests/test_loss_dispatch.py tests/test_loss_host_sync.py tests/test_kernel_report.py
echo "oldest stack: tests passed in $((SECONDS - start)) s"
