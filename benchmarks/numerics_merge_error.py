"""The locked (default) and deterministic column merges of the Triton forward against an fp64 truth.

Max absolute error of row_lse, col_lse, row_expect and col_expect (expected log-probabilities) of
torch.ops.fastclip.clip_loss_fwd_triton on unit-norm random features at scale 100 (issue 16's
recipe: B = 4096, D = 16 gives 64 row blocks per column at the interpreter's 64-row tiles). Prints;
writes nothing. docs/numerics.md.

    TRITON_INTERPRET=1 python benchmarks/numerics_merge_error.py --rows 4096 --cols 4096 --dim 16
"""
from __future__ import annotations

import argparse

import torch

import fastclip.ops.clip_loss_triton  # noqa: F401  (registers the op)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--scale", type=float, default=100.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(args.rows, args.dim, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(args.cols, args.dim, generator=generator), dim=-1)
    logits = args.scale * image.double() @ text.double().T
    truth = (logits.logsumexp(1), logits.logsumexp(0), (logits.softmax(1) * logits.log_softmax(1)).sum(1),
             (logits.softmax(0) * logits.log_softmax(0)).sum(0))
    device = torch.device(args.device)
    scale, bias = torch.tensor(args.scale, device=device), torch.tensor(0.0, device=device)
    for deterministic in (True, False):
        outputs = torch.ops.fastclip.clip_loss_fwd_triton(image.to(device), text.to(device), scale, bias, True,
                                                           deterministic)
        errors = [(ours.double().cpu() - exact).abs().max().item() for ours, exact in zip(outputs, truth)]
        print(f"{'deterministic' if deterministic else 'locked':13s} " + "  ".join(
            f"{name} {error:.2e}" for name, error in zip(("row_lse", "col_lse", "row_expect", "col_expect"), errors)))


if __name__ == "__main__":
    main()
