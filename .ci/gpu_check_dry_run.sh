#!/usr/bin/env bash
# CI: run benchmarks/gpu_check.sh exactly as a GPU machine does (`bash benchmarks/gpu_check.sh OUT_DIR`
# in the repository root), here without a GPU (its dry run), and fail unless its tests really ran.
#
# It runs on what a GPU machine receives, in an interpreter shaped like the GPU image:
#   - a clean copy of the tree: the tracked files and the untracked ones git does not ignore
#     (no virtual environment, no egg-info, no build outputs);
#   - python3 of a fresh virtual environment that sees this environment's packages except fastclip
#     itself and those the GPU image lacks (ftfy, wcwidth, open_clip, inf_cl, siglip_kernel, nvtx,
#     webdataset), so the script must run fastclip from the copy (no install) and skip the peers, saying so.
# Needs: the active Python with torch, triton, pytest (CI's .venv).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
HIDDEN_PACKAGES="fastclip ftfy wcwidth open_clip open_clip_torch open_clip_train inf_cl siglip_kernel nvtx webdataset"

mkdir -p "$WORK/tree" "$WORK/site"
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && tar --null --files-from - -cf -) | tar -xf - -C "$WORK/tree"

python -m venv --without-pip "$WORK/env"
SITE_PACKAGES="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for entry in "$SITE_PACKAGES"/*; do
    base="$(basename "$entry")"
    top="${base%%-[0-9]*}"          # name-1.2.dist-info -> name
    top="${top%.py}"; top="${top%.pth}"
    top="${top#__editable__.}"; top="${top#__editable___}"
    top="${top%%_[0-9]*_finder}"
    hidden=0
    for name in $HIDDEN_PACKAGES; do
        [ "${top,,}" = "$name" ] && hidden=1
    done
    [ $hidden -eq 0 ] && ln -s "$entry" "$WORK/site/$base"
done
ENV_SITE="$("$WORK/env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "import site; site.addsitedir('$WORK/site')" > "$ENV_SITE/gpu_image_packages.pth"
for name in $HIDDEN_PACKAGES; do
    if (cd "$WORK" && PYTHONNOUSERSITE=1 "$WORK/env/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$name') is None)"); then
        echo "the GPU-image-shaped environment still sees $name"; exit 1
    fi
done

OUT="$WORK/gpu_check"
(cd "$WORK/tree" && PATH="$WORK/env/bin:$PATH" bash benchmarks/gpu_check.sh "$OUT")

python - "$OUT" <<'EOF'
"""The dry run counts only if its tests ran: junit XML with tests > 0, no errors or failures, some passed."""
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

out = Path(sys.argv[1])
problems = []
for name, must_pass in (("gpu_tests", False), ("small_shape_tests", True)):
    path = out / f"{name}.xml"
    if not path.exists():
        problems.append(f"{path.name} is missing")
        continue
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "errors", "failures", "skipped")}
    print(f"{name}: {counts}")
    if counts["tests"] == 0 or counts["errors"] or counts["failures"]:
        problems.append(f"{name}: {counts}")
    if must_pass and counts["tests"] - counts["skipped"] == 0:
        problems.append(f"{name}: every test was skipped")
environment = (out / "environment.txt").read_text()
for peer in ("open_clip", "inf_cl", "siglip_kernel", "nvtx", "ftfy"):
    if f"{peer}: NOT importable" not in environment:
        problems.append(f"environment.txt does not report {peer} as skipped")
if not (out / "clip_loss_gpu.csv").exists():
    problems.append("the benchmark's dry run wrote no clip_loss_gpu.csv")
tuned = out / "tuned_tiles_interpreter.json"
if not tuned.exists() or not all("fastest" in record for record in json.loads(tuned.read_text())["kernels"].values()):
    problems.append("the tuning stage's dry run timed no config of some kernel (tuned_tiles_interpreter.json)")
if problems:
    sys.exit("gpu_check.sh dry run did not really run: " + "; ".join(problems))
print("gpu_check.sh dry run: tests ran, peers reported as skipped, benchmark rows written")
EOF
