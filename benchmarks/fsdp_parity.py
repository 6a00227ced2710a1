"""The --fsdp parity table: per-step losses and final weights of FSDP2 against DDP, W=2, fp32, gloo on CPU.

    python benchmarks/fsdp_parity.py                     # to a scratch folder; prints the table
    python benchmarks/fsdp_parity.py --update-results    # appended to benchmarks/results/fsdp_parity.csv

Every variant trains 4 steps of fastclip-tiny at 32 px (4 samples per rank) twice in one spawned two-rank
world, once under DDP and once with --fsdp (``tests/train_utils.train_runs_in_world``, the runs of
tests/test_train_fsdp.py), and compares the logged losses and the final checkpoints' weights (FSDP's
gathered to rank 0). The bar is 1e-5 relative.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import add_output_arguments, append_results, output_dir  # noqa: E402

NAME = "fsdp_parity"
STEPS = 4
VARIANTS = {
    "plain": {},
    "--accum-freq 2": {"accum_freq": 2},
    "--grad-checkpointing": {"grad_checkpointing": True},
    "--accum-freq 2 --grad-checkpointing": {"accum_freq": 2, "grad_checkpointing": True},
    "--siglip": {"model": "fastclip-tiny-siglip", "siglip": True, "local_loss": False, "gather_with_grad": False},
    "--lock-image (LiT)": {"lock_image": True},
}


def _relative(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-30)


def compare(ddp: Path, fsdp: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from fastclip.train.checkpoint import list_checkpoints

    losses = [[json.loads(line)["loss"] for line in open(folder / "metrics.jsonl")] for folder in (ddp, fsdp)]
    weights = [load_file(str(list_checkpoints(folder)[-1] / "model.safetensors")) for folder in (ddp, fsdp)]
    worst = max(((weights[1][name] - value).abs().max() / value.abs().max().clamp_min(1e-30)).item()
                for name, value in weights[0].items() if value.is_floating_point())
    return {"ddp_losses": " ".join(f"{value:.7f}" for value in losses[0]),
            "fsdp_losses": " ".join(f"{value:.7f}" for value in losses[1]),
            "max_loss_rel_diff": max(_relative(a, e) for a, e in zip(losses[1], losses[0])),
            "max_weight_rel_diff": worst, "same_keys": sorted(weights[0]) == sorted(weights[1]),
            "steps": len(losses[0]), "torch": torch.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    from tests.distributed_utils import run_in_world
    from tests.train_utils import train_runs_in_world

    root = Path(tempfile.mkdtemp(prefix="fsdp-parity-"))
    runs = [(f"{engine}-{index}", {**extra, "fsdp": engine == "fsdp"})
            for index, extra in enumerate(VARIANTS.values()) for engine in ("ddp", "fsdp")]
    run_in_world(train_runs_in_world, 2, timeout_s=3600, root=str(root), runs=runs, steps=STEPS)
    rows = [{"variant": variant, "world_size": 2, "precision": "fp32", "backend": "gloo",
             **compare(root / f"ddp-{index}", root / f"fsdp-{index}")} for index, variant in enumerate(VARIANTS)]
    print("| flags (all with --local-loss --gather-with-grad but --siglip) | DDP losses, steps 1-4 | "
          "max rel. diff of FSDP's losses | of its final weights |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['ddp_losses']} | {row['max_loss_rel_diff']:.1e} | "
              f"{row['max_weight_rel_diff']:.1e} |")
    folder = output_dir(args)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"results: {append_results(NAME, rows, folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
