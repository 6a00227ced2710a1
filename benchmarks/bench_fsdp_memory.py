"""Benchmark: memory per rank of a training step with --fsdp (FSDP2) against DDP, on CPU with gloo.

    python benchmarks/bench_fsdp_memory.py                       # ViT-B-32, DDP and FSDP at W=2 and W=4, scratch
    python benchmarks/bench_fsdp_memory.py --update-results      # appended to benchmarks/results/
    python benchmarks/bench_fsdp_memory.py --model fastclip-tiny --worlds 2   # a quick look

Each case (engine, W) is a fresh gloo world of W processes (one thread each) that builds the model from one
seed, wraps it as the trainer does (``torch.nn.parallel.DistributedDataParallel``, or
``fastclip.train.fsdp.shard_model``), builds the trainer's AdamW and takes ``--steps`` training steps
(``accumulation.forward_backward`` + ``loop.optimizer_update``, the ClipLoss with --local-loss
--gather-with-grad) on a batch of ``--batch-size`` per rank. Per rank it reports:

- ``state_mb``: parameters + gradients + optimizer state held by this rank, counted from the tensors
  (local shards under FSDP), right after the last backward: what FSDP divides by W;
- ``step_peak_mb``: the peak RSS growth over the steps (glibc's mmap threshold pinned low so freed tensors
  leave the RSS; ``_common.low_mmap_threshold``), which adds activations, gathered blocks and buffers;
- ``rss_mb``: the RSS after the steps (the Python/torch runtime included).

Output: bench_fsdp_memory.csv/json (rows appended) and bench_fsdp_memory_cpu.png in ``--out-dir`` or, with
``--update-results``, benchmarks/results/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (add_output_arguments, append_results, current_rss_bytes, low_mmap_threshold,  # noqa: E402
                     output_dir, peak_rss_bytes, reset_peak_rss)

NAME = "bench_fsdp_memory"
MB = 2 ** 20


def _local_bytes(tensor) -> int:
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return tensor.numel() * tensor.element_size()


def _state_bytes(model, optimizer) -> dict:
    params = list(model.parameters())
    optimizer_bytes = sum(_local_bytes(value) for state in optimizer.state.values() for value in state.values()
                          if hasattr(value, "numel") and value.ndim > 0)
    return {"param_mb": sum(_local_bytes(p) for p in params) / MB,
            "grad_mb": sum(_local_bytes(p.grad) for p in params if p.grad is not None) / MB,
            "optimizer_mb": optimizer_bytes / MB}


def measure_rank(rank: int, world_size: int, *, engine: str, model_name: str, batch_size: int, steps: int) -> dict:
    """One rank of a case: build, wrap, step; returns its measurements."""
    import torch

    import fastclip
    from fastclip.distributed.comm import World
    from fastclip.loss import ClipLoss
    from fastclip.train.accumulation import forward_backward
    from fastclip.train.config import TrainConfig
    from fastclip.train.fsdp import shard_model
    from fastclip.train.loop import TrainParts, optimizer_update
    from fastclip.train.optim import build_optimizer, find_parameter

    torch.manual_seed(0)
    model = fastclip.create_model(model_name)
    config = TrainConfig(model=model_name, dataset_type="synthetic", fsdp=engine == "fsdp")
    wrapped = shard_model(model, config) if engine == "fsdp" else torch.nn.parallel.DistributedDataParallel(model)
    optimizer, _ = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    ctx = World(rank=rank, size=world_size)
    parts = TrainParts(model=wrapped, unwrapped=model, optimizer=optimizer, schedule=None, scaler=None, ctx=ctx,
                       loss_fn=ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size),
                       logit_scale=find_parameter(model, "logit_scale"), precision="fp32",
                       trainable=[p for p in model.parameters() if p.requires_grad])
    size, length = model.config.vision.image_size, model.context_length
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    tokens = torch.randint(1, 49000, (batch_size, length), generator=generator)
    baseline = reset_peak_rss()
    state = {}
    for _ in range(steps):
        loss = forward_backward(wrapped, parts.loss_fn, images, tokens, precision="fp32", device=ctx.device)
        state = _state_bytes(model, optimizer)  # gradients present: the step's high-water mark of state
        optimizer_update(parts, loss)
    state = {**state, "optimizer_mb": _state_bytes(model, optimizer)["optimizer_mb"]}  # created by the first step
    return {**state, "state_mb": state["param_mb"] + state["grad_mb"] + state["optimizer_mb"],
            "step_peak_mb": (peak_rss_bytes() - baseline) / MB, "rss_mb": current_rss_bytes() / MB,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}


def run_case(engine: str, world_size: int, args) -> dict:
    from tests.distributed_utils import run_in_world

    with low_mmap_threshold():
        # a slow rank on a shared CPU box may keep the others waiting long in a collective
        ranks = run_in_world(measure_rank, world_size, timeout_s=3600, collective_timeout_s=1800, engine=engine,
                             model_name=args.model,
                             batch_size=args.batch_size, steps=args.steps)
    row = {"model": args.model, "engine": engine, "world_size": world_size, "batch_per_rank": args.batch_size,
           "steps": args.steps, "device": "cpu", "backend": "gloo"}
    for key in ("param_mb", "grad_mb", "optimizer_mb", "state_mb", "step_peak_mb", "rss_mb"):
        row[key] = max(rank[key] for rank in ranks)  # the largest rank
    row["parameters_m"] = ranks[0]["parameters_m"]
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['engine'].upper()}\nW={row['world_size']}" for row in rows]
    parts = [("param_mb", "parameters"), ("grad_mb", "gradients"), ("optimizer_mb", "AdamW state")]
    figure, axis = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(rows)
    for key, label in parts:
        values = [row[key] for row in rows]
        axis.bar(labels, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    axis.plot(labels, [row["step_peak_mb"] for row in rows], "k^", label="peak RSS growth over the steps")
    axis.set_ylabel("MiB per rank (largest rank)")
    axis.set_title(f"{rows[0]['model']} on CPU/gloo, batch {rows[0]['batch_per_rank']} per rank, fp32")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--engines", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--batch-size", type=int, default=2, help="per rank")
    parser.add_argument("--steps", type=int, default=2)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    rows = []
    for world_size in args.worlds:
        for engine in args.engines:
            row = run_case(engine, world_size, args)
            rows.append(row)
            print(f"{engine} W={world_size}: state {row['state_mb']:.0f} MiB (params {row['param_mb']:.0f}, grads "
                  f"{row['grad_mb']:.0f}, optimizer {row['optimizer_mb']:.0f}), step peak +{row['step_peak_mb']:.0f} "
                  f"MiB, RSS {row['rss_mb']:.0f} MiB", flush=True)
    ddp = {row["world_size"]: row for row in rows if row["engine"] == "ddp"}
    for row in rows:
        reference = ddp.get(row["world_size"]) or next(iter(ddp.values()), None)
        if reference is not None:
            row["state_vs_ddp"] = row["state_mb"] / reference["state_mb"]
    folder = output_dir(args)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"results: {append_results(NAME, rows, folder)}")
    plot(rows, folder / f"{NAME}_cpu.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
