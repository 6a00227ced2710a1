"""An estimate, not a measurement: what fits per GPU for ViT-g/14 and ViT-bigG/14 on 8 x A100-80GB, with DDP,
--fsdp, and --fsdp + --grad-checkpointing + --fsdp-offload-cpu (docs/scale_out.md prints its table).

    python benchmarks/fsdp_memory_estimate.py [--gpus 8] [--gpu-gib 80] [--models ViT-g-14 ViT-bigG-14]

The model (``--precision amp_bf16``, AdamW, the fused CLIP loss whose memory is O(B D)):

- training state per parameter: fp32 weights 4 B + fp32 gradients 4 B + AdamW moments 8 B = 16 B; DDP adds its
  gradient buckets (4 B); FSDP divides the 16 B by the GPU count and adds two gathered bf16 blocks (the
  running one and the prefetched one); CPU offload moves the 16 B / W to host memory;
- activations per sample and residual block of L tokens of width D and MLP ratio r, saved for backward in bf16
  with SDPA attention (no L x L scores): LayerNorm inputs 4 LD, QKV input and Q, K, V, output 10 LD, MLP input
  2 LD + its hidden activations 4 r LD: (16 + 4 r) L D bytes; with gradient checkpointing each block keeps its
  input (2 L D) and one block at a time is recomputed;
- usable memory: ``--usable`` (0.9) of the GPU minus 1.5 GiB for the CUDA context and workspaces.

Parameter counts come from fastclip's configs (built on the meta device). Expect +-30 %: autocast keeps some
activations (the residual stream, LayerNorm outputs) in fp32, and allocator fragmentation is not modelled.
Not measured on GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2 ** 30


def tower_shapes(config) -> list[tuple[int, int, float, int]]:
    """(tokens L, width D, MLP ratio r, layers) of the image tower and the text tower."""
    vision, text = config.vision, config.text
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    return [(tokens, vision.width, vision.mlp_width / vision.width, vision.layers),
            (text.context_length, text.width, text.mlp_width / text.width, text.layers)]


def activation_bytes(config, checkpointing: bool) -> float:
    """Bytes of saved activations per sample (see the module docstring)."""
    full = [(16 + 4 * ratio) * tokens * width for tokens, width, ratio, _ in tower_shapes(config)]
    if not checkpointing:
        return sum(block * layers for block, (_, _, _, layers) in zip(full, tower_shapes(config)))
    kept = sum(2 * tokens * width * layers for tokens, width, _, layers in tower_shapes(config))
    return kept + max(full)  # block inputs + the one block being recomputed


def largest_block_parameters(config) -> int:
    return max(width * width * (4 + 2 * ratio) for _, width, ratio, _ in tower_shapes(config))


def estimate(name: str, gpus: int, gpu_gib: float, usable: float) -> list[dict]:
    import torch

    import fastclip

    with torch.device("meta"):
        model = fastclip.create_model(name)
    parameters = sum(p.numel() for p in model.parameters())
    budget = usable * gpu_gib * GIB - 1.5 * GIB
    gathered = 2 * 2 * largest_block_parameters(model.config)  # two bf16 blocks
    setups = [("DDP", 20 * parameters, False), ("DDP + checkpointing", 20 * parameters, True),
              ("FSDP", 16 * parameters / gpus + gathered, False),
              ("FSDP + checkpointing", 16 * parameters / gpus + gathered, True),
              ("FSDP + checkpointing + offload", gathered, True)]
    rows = []
    for setup, fixed, checkpointing in setups:
        per_sample = activation_bytes(model.config, checkpointing)
        batch = int(max(0.0, budget - fixed) // per_sample)
        rows.append({"model": name, "parameters_b": parameters / 1e9, "setup": setup, "fixed_gib": fixed / GIB,
                     "activation_mib_per_sample": per_sample / 2 ** 20, "batch_per_gpu": batch,
                     "global_batch": batch * gpus})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-g-14", "ViT-bigG-14"])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--usable", type=float, default=0.9)
    args = parser.parse_args(argv)
    print(f"| model (parameters) | setup | state + gathered blocks per GPU | activations per sample | "
          f"batch per GPU (x{args.gpus}) |")
    print("|---|---|---|---|---|")
    for name in args.models:
        for row in estimate(name, args.gpus, args.gpu_gib, args.usable):
            print(f"| {row['model']} ({row['parameters_b']:.2f} B) | {row['setup']} | {row['fixed_gib']:.1f} GiB | "
                  f"{row['activation_mib_per_sample']:.0f} MiB | {row['batch_per_gpu']} ({row['global_batch']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
