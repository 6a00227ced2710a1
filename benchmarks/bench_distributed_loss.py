"""Distributed CLIP loss benchmark: fastclip gather / ring vs open_clip (local_loss + gather_with_grad).

    python benchmarks/bench_distributed_loss.py            # gloo on CPU: W = 2, 4; b = 1024, 2048; D = 512
    python benchmarks/bench_distributed_loss.py --quick    # W = 2, 4; b = 256; D = 256 (about a minute)
    python benchmarks/bench_distributed_loss.py --update-results   # append to benchmarks/results/ (committed)
    torchrun --nproc_per_node=8 benchmarks/bench_distributed_loss.py --device cuda --out-dir OUT   # NCCL
    pytest benchmarks/bench_distributed_loss.py --benchmark-enable                   # pytest-benchmark view

All three compute open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``: the same value and
gradients on every rank (the tests check that), so only the cost differs. Per case, over ranks:
  ms_median   fwd+bwd time of one step (max over ranks of each rank's median), ranks barrier-synced
  peak_mb     extra peak memory during the first step (CPU: peak RSS over the step's baseline; CUDA:
              max_memory_allocated over the baseline), max over ranks
  saved_mb    bytes autograd keeps for backward (saved_tensors_hooks), max over ranks
  comm_mb     payload bytes of every torch.distributed call in one step (fastclip.distributed
              .count_communication, which counts open_clip's calls the same way), max over ranks
Without torchrun each case runs in a fresh world of W forked CPU processes (gloo), each with
cores // W intra-op threads. Under torchrun the launched world runs every case in turn (NCCL on
CUDA, where max_memory_allocated is reset per case; a CPU torchrun run's peak RSS is not, so its
peak_mb only shows growth over the earlier cases).
Output: ``--out-dir`` (default: a scratch folder under the system temp dir, printed at the end), or
``--update-results`` for benchmarks/results/: bench_distributed_loss.csv/json (rows appended) and
bench_distributed_loss_<device>_w<W>.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
import _measure  # noqa: E402
import _results  # noqa: E402

IMPLEMENTATIONS = ("fastclip-gather", "fastclip-ring", "open_clip")


def _loss_module(implementation: str, rank: int, world_size: int):
    if implementation == "open_clip":
        from open_clip.loss import ClipLoss

        return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    from fastclip.loss import ClipLoss

    return ClipLoss(local_loss=True, gather_with_grad=True, dist_impl=implementation.split("-")[1])


def _features(batch: int, dim: int, device, dtype, seed: int):
    import torch
    import torch.nn.functional as F

    generator = torch.Generator(device="cpu").manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).to(device=device, dtype=dtype)
    text = F.normalize(image + torch.randn(batch, dim, generator=generator), dim=-1).to(device=device, dtype=dtype)
    scale = torch.tensor(14.3, device=device)
    return [image.requires_grad_(), text.requires_grad_(), scale.requires_grad_()]


def rank_case(rank: int, world_size: int, case: dict) -> dict:
    """One (implementation, b, D) on this rank of an initialised group: time, memory, bytes."""
    import torch
    import torch.distributed as dist

    from fastclip.distributed import count_communication

    device = torch.device(case["device"])
    dtype = getattr(torch, case["dtype"])
    module = _loss_module(case["implementation"], rank, world_size)

    def step(tensors):
        for tensor in tensors:
            tensor.grad = None
        module(*tensors).backward()

    step(_features(8, case["dim"], device, dtype, seed=rank))  # lazy imports and first-call setup, not measured
    tensors = _features(case["batch"], case["dim"], device, dtype, seed=1000 + rank)
    dist.barrier()
    baseline = _measure.reset_peak_memory(device)
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = module(*tensors)
    loss.backward()
    del loss
    peak = _measure.peak_memory(device)
    with count_communication() as counter:
        step(tensors)
    samples = []
    for _ in range(case["repeats"]):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step(tensors)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return {"ms_median": samples[len(samples) // 2], "ms_min": samples[0], "peak_mb": max(0, peak - baseline) / 2**20,
            "saved_mb": sum(storages.values()) / 2**20, "comm_mb": counter.total_bytes / 2**20}


def _world_case(rank: int, world_size: int, case: dict) -> dict:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return rank_case(rank, world_size, case)


def _combine(case: dict, per_rank: list[dict]) -> dict:
    """Slowest rank's time, largest rank's memory and traffic."""
    row = {**case, "status": "ok", "world_size": len(per_rank), "global_batch": case["batch"] * len(per_rank)}
    for key in ("ms_median", "ms_min", "peak_mb", "saved_mb", "comm_mb"):
        row[key] = max(result[key] for result in per_rank)
    return row


def _print_and_ratios(rows: list[dict]) -> None:
    by_key = {}
    for row in rows:
        by_key.setdefault((row["world_size"], row["batch"]), {})[row["implementation"]] = row
    for (world_size, batch), group in sorted(by_key.items()):
        reference = group.get("open_clip")
        for name, row in group.items():
            line = (f"W={world_size} b={batch:5d} {name:16s} {row['ms_median']:9.1f} ms  peak +{row['peak_mb']:8.1f} MB"
                    f"  saved {row['saved_mb']:7.2f} MB  comm {row['comm_mb']:7.2f} MB")
            if reference is not None and name != "open_clip":
                for key, label in (("ms_median", "time"), ("peak_mb", "peak"), ("comm_mb", "comm")):
                    row[f"{label}_vs_open_clip"] = row[key] / max(reference[key], 1e-9)
                line += (f"   vs open_clip: time {row['time_vs_open_clip']:.2f}x  peak {row['peak_vs_open_clip']:.2f}x"
                         f"  comm {row['comm_vs_open_clip']:.2f}x")
            print(line, flush=True)


def _cases(args, device: str, dtype: str) -> list[dict]:
    return [{"op": "distributed_clip_loss", "implementation": implementation, "device": device, "dtype": dtype,
             "backend": "nccl" if device.startswith("cuda") else "gloo", "batch": batch, "dim": args.dim,
             "repeats": args.repeats, "local_loss": True, "gather_with_grad": True}
            for batch in args.batches for implementation in IMPLEMENTATIONS]


def _preload() -> None:
    """Import the losses once in the parent: forked ranks inherit them instead of importing per case."""
    import open_clip.loss  # noqa: F401

    import fastclip.distributed  # noqa: F401
    import fastclip.loss  # noqa: F401


def _run_local_worlds(args, dtype: str) -> list[dict]:
    from tests.distributed_utils import run_in_world

    _preload()

    rows = []
    for world_size in args.world_sizes:
        for case in _cases(args, "cpu", dtype):
            try:
                rows.append(_combine(case, run_in_world(_world_case, world_size, timeout_s=3600, case=case)))
            except (RuntimeError, TimeoutError) as error:
                rows.append({**case, "world_size": world_size, "status": f"failed: {str(error)[-300:]}"})
                print(rows[-1]["status"], flush=True)
    return rows


def _run_under_torchrun(args, dtype: str) -> list[dict] | None:
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = args.device
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rows = []
    for case in _cases(args, device, dtype):
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, rank_case(rank, world_size, case))
        rows.append(_combine({**case, "device": args.device}, per_rank))
    dist.destroy_process_group()
    return rows if rank == 0 else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, under torchrun)")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4], help="without torchrun")
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 2048], help="local batch b per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="b = 256, D = 256, 3 repeats")
    _results.add_output_arguments(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.dim, args.repeats = [256], 256, 3
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        rows = _run_under_torchrun(args, dtype)
        if rows is None:
            return 0
    elif args.device.startswith("cuda"):
        parser.error(f"--device cuda runs under torchrun: torchrun --nproc_per_node=<GPUs> {__file__} --device cuda")
    else:
        rows = _run_local_worlds(args, dtype)
    ok = [row for row in rows if row.get("status") == "ok"]
    _print_and_ratios(ok)
    out = _results.output_dir(args)
    path = _results.append_results("bench_distributed_loss", rows, out)
    plot(ok, args.device.split(":")[0], out)
    print(f"results: {path}")
    return 0


def plot(rows: list[dict], device_kind: str, out: Path) -> None:
    """One PNG per world size: time, extra peak memory and bytes per step against the local batch b."""
    for world_size in sorted({row["world_size"] for row in rows}):
        group = [row for row in rows if row["world_size"] == world_size]
        _results.plot_results(group, x="batch", series="implementation",
                              panels=[("ms_median", "fwd+bwd time per step (ms)"), ("peak_mb", "extra peak memory (MB)"),
                                      ("comm_mb", "bytes communicated per step (MB)")],
                              title=f"distributed CLIP loss, W={world_size}, x = local batch b per rank, "
                                    f"D={group[0]['dim']}, {group[0]['dtype']}, {device_kind}",
                              output=out / f"bench_distributed_loss_{device_kind}_w{world_size}.png")


# ---- pytest-benchmark view: a W=2 gloo world per implementation, small sizes -----------------------------
try:
    import pytest

    @pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
    def test_distributed_clip_loss_step(benchmark, implementation):
        """Times a whole W=2 world of 3 steps (startup included); in-rank step time goes to extra_info."""
        from tests.distributed_utils import run_in_world

        _preload()
        case = {"implementation": implementation, "device": "cpu", "dtype": "float32", "batch": 256, "dim": 256,
                "repeats": 3}
        benchmark.group = "distributed_clip_loss W=2 b=256 D=256 (gloo, world incl. startup)"
        per_rank = benchmark.pedantic(run_in_world, args=(_world_case, 2), kwargs={"case": case}, rounds=1)
        benchmark.extra_info.update(_combine(case, per_rank))
except ImportError:  # running as a script without pytest installed
    pass


if __name__ == "__main__":
    raise SystemExit(main())
