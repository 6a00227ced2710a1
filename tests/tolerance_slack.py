"""Slack of the error bars of tests/numerics.py: bound / actual error, per quantity and dtype.

    python tests/tolerance_slack.py [pytest args...]      # default: the CPU tests that use the bars

Runs pytest with FASTCLIP_SLACK_LOG set (numerics.assert_close_to_truth then records each judgement)
and prints, per (quantity, dtype), the smallest and largest slack under the old floor
(TOL[input dtype] * max(1, |truth|)) and the current one (TOL * |truth|, TOL of fp32 for fp32 outputs). A slack of 1000 means an error 1000x
the measured one would still pass. Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_TARGETS = ["tests/test_clip_loss.py", "tests/test_siglip_loss.py", "tests/test_attention.py",
                   "tests/test_loss_ops.py", "tests/test_clip_loss_triton.py", "tests/test_siglip_loss_triton.py",
                   "-k", "low_precision or small_workspace or accelerator or error_bars or primitives_match"]


def quantity(name: str) -> str:
    """'grad logit_scale' / 'clip logit_scale (seed 3)' / 'grad_scale' -> a short quantity name."""
    name = name.split(" (")[0].split("[")[0]
    return name.split(" ")[-1]


def main(argv: list[str]) -> int:
    from tests.numerics import K, TOL

    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "slack.jsonl"
        environment = dict(os.environ, FASTCLIP_SLACK_LOG=str(log))
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(argv or DEFAULT_TARGETS)],
                             cwd=ROOT, env=environment)
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    tolerances = {str(dtype).replace("torch.", ""): value for dtype, value in TOL.items()}
    table = collections.defaultdict(lambda: {"old": [], "new": []})
    for record in records:
        error = record["error"]
        if error == 0.0:  # exact (e.g. a gradient that is 0 in every precision): no slack to speak of
            continue
        base = K[record["kind"]] * record["baseline_error"]
        tol = tolerances[record["dtype"]]
        key = (quantity(record["name"]), record["dtype"])
        table[key]["old"].append((base + tol * max(1.0, record["truth_max"])) / error)
        table[key]["new"].append(record["bound"] / error)
    print(f"\n{'quantity':14s} {'dtype':9s} {'n':>3s} {'old slack min..max':>22s} {'new slack min..max':>22s}")
    for (name, dtype), slack in sorted(table.items()):
        old, new = slack["old"], slack["new"]
        print(f"{name:14s} {dtype:9s} {len(old):3d} {min(old):10.3g} .. {max(old):9.3g} {min(new):10.3g} .. {max(new):9.3g}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
