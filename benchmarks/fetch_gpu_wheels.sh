#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels the GPU machine's image lacks, so that
# benchmarks/gpu_check.sh compares fastclip with open_clip, Inf-CL and siglip-kernel there (it has no
# network). How the wheels travel: docs/gpu.md.
#
#     bash benchmarks/fetch_gpu_wheels.sh [DIR]      # default DIR: .whl/ in the repository root (git-ignored)
#
# The GPU image (Python 3.12, torch 2.11, triton 3.6) already has open_clip's other needs (timm,
# huggingface_hub, safetensors, regex, tqdm, torchvision); only these are missing. gpu_check.sh
# installs each wheel of DIR (or of FASTCLIP_WHEELS), one at a time, --no-index --no-deps, into a throw-away
# folder on PYTHONPATH. Carry the folder to the GPU machine (the device tool: carry [".whl"]).
# Versions are pinned to the ones the CPU test suite runs against.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$REPO/.whl}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$DIR"
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 inf_cl==1.2.1 siglip-kernel==0.1.2 nvtx==0.2.17)
PLATFORMS=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$platform")
done
for wheel in "${WHEELS[@]}"; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$DIR" "$wheel"
done
ls -l "$DIR"
