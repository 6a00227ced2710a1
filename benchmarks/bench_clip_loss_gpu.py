"""GPU benchmark of the CLIP loss: fastclip's triton and torch backends, open_clip and Inf-CL, side by
side with the 4-GEMM floor measured in the same run.

    python benchmarks/bench_clip_loss_gpu.py OUT_DIR                # bf16, D 512/768/1024, B 4096.. (8 min max)
    python benchmarks/bench_clip_loss_gpu.py OUT_DIR --quick        # D 512, B 4096..16384
    python benchmarks/bench_clip_loss_gpu.py OUT_DIR --dry-run      # CPU + Triton interpreter, tiny sizes:
                                                                    # checks this script, measures nothing
    pytest tests/test_bench_clip_loss_gpu.py --benchmark-enable      # pytest-benchmark view (GPU) + dry run

Peers (each skipped, with the reason in the CSV, when it cannot run here):
    floor      four torch.matmul of the loss's shapes: S = I T^T (fwd), then S again, S T and S^T I
               (what any fused backward recomputes and multiplies) - 8 B^2 D FLOP for fwd+bwd
    triton     fastclip.loss.ClipLoss(backend="triton") (default: locked column merge in the forward)
    triton_det the same with deterministic=True (fixed-order column partials: bitwise repeatable)
    cuda       fastclip.loss.ClipLoss(backend="cuda") (the CUDA C++ kernels; needs FASTCLIP_BUILD_CUDA=1)
    triton_ws1g  the same with a 1 GiB workspace (FASTCLIP_WORKSPACE_MB=1024; default: fastclip.ops.workspace): fewer
               backward chunks, so less fp32 re-reading of grad_text - what a larger bound buys
    torch      fastclip.loss.ClipLoss(backend="torch") (chunked PyTorch)
    open_clip  open_clip.loss.ClipLoss (materialises B x B logits)
    inf_cl     Inf-CL's cal_inf_loss, symmetric = mean of the two directions (D must be a multiple of 256)
Modes: fwd (autograd on, as in training) and fwd+bwd. Columns: median/p20/p80 ms, TFLOP/s counting
2 B^2 D per GEMM-equivalent (fwd 1, fwd+bwd 4), extra peak memory over the inputs
(max_memory_allocated), the memory bound of the design (2 B D elt + the workspace + 64 B bytes),
time / floor, and speedups over open_clip and Inf-CL. B doubles from 4096 until a peer runs out of
memory, gets too slow for the time budget, or --max-batch. Rows: OUT_DIR/clip_loss_gpu.csv/json,
plots: OUT_DIR/clip_loss_gpu_D<dim>.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402
import _results  # noqa: E402

PEERS = ("floor", "triton", "triton_det", "triton_ws1g", "cuda", "torch", "open_clip", "inf_cl")
LARGE_WORKSPACE_MB = "1024"  # triton_ws1g: the triton backend with FASTCLIP_WORKSPACE_MB=1024
GEMMS = {"fwd": 1, "fwd+bwd": 4}
SLOW_CALL_MS = 1500.0  # a peer slower than this per call is not run at the next (4x costlier) B


def make_inputs(batch: int, dim: int, device: str, dtype):
    import torch
    import torch.nn.functional as F

    generator = torch.Generator(device=device).manual_seed(batch + dim)
    image = F.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=-1)
    text = F.normalize(0.5 * image + torch.randn(batch, dim, device=device, generator=generator), dim=-1)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    return image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_(), scale


def peer_unavailable(peer: str, dim: int, device: str) -> str | None:
    """Why ``peer`` cannot run here, or None."""
    if peer == "cuda":
        return _cuda_unavailable(device)
    if peer == "open_clip":
        try:
            import open_clip.loss  # noqa: F401
        except ImportError:
            return "skipped: open_clip is not importable here"
    if peer == "inf_cl":
        if device != "cuda":
            return "skipped: Inf-CL needs CUDA"
        try:
            import inf_cl  # noqa: F401
        except ImportError:
            return "skipped: inf_cl is not importable here (pip install inf-cl)"
        if dim % 256:
            return "skipped: Inf-CL needs D to be a multiple of its head_dim 256"
    return None


def _cuda_unavailable(device: str) -> str | None:
    if device != "cuda":
        return "skipped: the CUDA kernels need a CUDA GPU"
    import torch

    from fastclip.ops import cuda_common

    reasons = cuda_common.install_reasons() or cuda_common.arch_reasons(torch.cuda.get_device_capability())
    return f"skipped: {'; '.join(reasons)}" if reasons else None


def loss_function(peer: str):
    """(image, text, scale) -> scalar symmetric CLIP loss, for the loss peers."""
    if peer in ("triton", "triton_det", "triton_ws1g", "cuda", "torch"):
        from fastclip.loss import ClipLoss

        return ClipLoss(backend="triton" if peer.startswith("triton") else peer, deterministic=peer == "triton_det")
    if peer == "open_clip":
        from open_clip.loss import ClipLoss

        return ClipLoss()
    from inf_cl import cal_inf_loss

    return lambda image, text, scale: 0.5 * (cal_inf_loss(image, text, scale=scale)
                                             + cal_inf_loss(text, image, scale=scale))


def make_step(peer: str, tensors, mode: str):
    """A callable running one iteration of ``peer`` in ``mode``, and the buffers it keeps alive."""
    import torch

    image, text, scale = tensors
    if peer == "floor":
        image, text = image.detach(), text.detach()
        logits = torch.empty(image.shape[0], text.shape[0], dtype=image.dtype, device=image.device)
        grad_image, grad_text = torch.empty_like(image), torch.empty_like(text)

        def floor_step():
            torch.matmul(image, text.T, out=logits)
            if mode == "fwd+bwd":
                torch.matmul(image, text.T, out=logits)
                torch.matmul(logits, text, out=grad_image)
                torch.matmul(logits.T, image, out=grad_text)
        return floor_step
    loss_fn = loss_function(peer)
    workspace_mb = LARGE_WORKSPACE_MB if peer == "triton_ws1g" else os.environ.get("FASTCLIP_WORKSPACE_MB")

    def loss_step():
        for tensor in tensors:
            tensor.grad = None
        previous = os.environ.get("FASTCLIP_WORKSPACE_MB")
        _set_env("FASTCLIP_WORKSPACE_MB", workspace_mb)
        try:
            loss = loss_fn(image, text, scale)
            if mode == "fwd+bwd":
                loss.backward()
        finally:
            _set_env("FASTCLIP_WORKSPACE_MB", previous)
        return loss
    return loss_step


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def measure(peer: str, batch: int, dim: int, mode: str, device: str, dtype, repeats: int) -> dict:
    import torch

    row = {"peer": peer, "mode": mode, "B": batch, "D": dim, "dtype": str(dtype).replace("torch.", ""),
           "device": device}
    reason = peer_unavailable(peer, dim, device)
    if reason:
        return {**row, "status": reason}
    tensors = make_inputs(batch, dim, device, dtype)
    try:
        step = make_step(peer, tensors, mode)
        first = step()  # compiles kernels / warms cuBLAS outside the timed and measured parts
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        step()
        extra = torch.cuda.max_memory_allocated() - base if device == "cuda" else float("nan")
        timing = _measure.time_function(step, device=device, warmup=0, repeats=repeats)
    except torch.cuda.OutOfMemoryError:
        return {**row, "status": "oom"}
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    flops = 2.0 * GEMMS[mode] * batch * batch * dim
    from fastclip.ops.workspace import workspace_bytes  # the default, or FASTCLIP_WORKSPACE_MB as set

    workspace = int(LARGE_WORKSPACE_MB) * 2**20 if peer == "triton_ws1g" else workspace_bytes()
    element = tensors[0].element_size()
    bound = memory_bound_terms(batch, dim, element, workspace)
    return {**row, **timing, "status": "ok", "tflops": flops / (timing["ms_median"] * 1e-3) / 1e12,
            "extra_peak_mb": extra / 2**20, **bound, "memory_margin_mb": bound["memory_bound_mb"] - extra / 2**20,
            "loss": float(first.detach()) if first is not None else float("nan")}


def memory_bound_terms(batch: int, dim: int, element: int, workspace: int) -> dict:
    """The design's bound on extra peak memory, term by term, MiB: the two feature gradients in the
    input dtype (2 B D elt), the backward workspace (FASTCLIP_WORKSPACE_MB), and 64 bytes per pair of
    O(B) vectors (log-sum-exps, norms, scale partials)."""
    terms = {"bound_gradients_mb": 2 * batch * dim * element / 2**20, "bound_workspace_mb": workspace / 2**20,
             "bound_vectors_mb": 64 * batch / 2**20}
    return {**terms, "memory_bound_mb": sum(terms.values())}


def add_ratios(rows: list[dict]) -> None:
    """time / floor, and speedups over open_clip and Inf-CL, for rows of one (B, D, mode)."""
    by_peer = {row["peer"]: row for row in rows if row.get("status") == "ok"}
    for row in rows:
        if row.get("status") != "ok":
            continue
        for peer, column, invert in (("floor", "ratio_to_floor", False), ("open_clip", "speedup_vs_open_clip", True),
                                     ("inf_cl", "speedup_vs_inf_cl", True)):
            if peer in by_peer and row["peer"] != peer:
                ratio = row["ms_median"] / by_peer[peer]["ms_median"]
                row[column] = 1 / ratio if invert else ratio
        if "torch" in by_peer and row["peer"] not in ("floor", "torch"):
            reference = by_peer["torch"]["loss"]
            row["loss_rel_diff_vs_torch"] = abs(row["loss"] - reference) / max(abs(reference), 1e-12)


def run(output: Path, dims, batches, modes, device: str, dtype, repeats: int, budget_s: float,
        peers=PEERS) -> list[dict]:
    deadline = time.monotonic() + budget_s
    all_rows = []
    for dim in dims:
        stopped: dict[str, str] = {}  # peer -> why it no longer runs at larger B for this D
        for batch in batches:
            for mode in modes:
                rows = []
                for peer in peers:
                    if time.monotonic() > deadline:
                        stopped.setdefault(peer, "skipped: time budget spent")
                    if peer in stopped:
                        rows.append({"peer": peer, "mode": mode, "B": batch, "D": dim, "status": stopped[peer]})
                        continue
                    row = measure(peer, batch, dim, mode, device, dtype, repeats)
                    rows.append(row)
                    if row["status"] == "oom":
                        stopped[peer] = "oom at a smaller B"
                    elif row["status"] == "ok" and row["ms_median"] > SLOW_CALL_MS:
                        stopped[peer] = f"skipped: {row['ms_median']:.0f} ms at B={batch}, too slow for the budget"
                    print(_format(row), flush=True)
                add_ratios(rows)
                all_rows += rows
                path = _results.append_results("clip_loss_gpu", rows, results_dir=output)  # kept if killed later
    for dim in dims:
        _results.plot_results([r for r in all_rows if r["D"] == dim and r.get("mode") == "fwd+bwd"], x="B",
                              series="peer", panels=[("ms_median", "fwd+bwd ms"), ("tflops", "TFLOP/s (8 B^2 D)"),
                                                     ("extra_peak_mb", "extra peak MiB")],
                              title=f"CLIP loss fwd+bwd, {device}, D={dim}", output=output / f"clip_loss_gpu_D{dim}.png")
    print(f"wrote {output / 'clip_loss_gpu.csv'}")
    print(summarize(all_rows, output))
    return all_rows


def summarize(rows: list[dict], output: Path) -> str:
    """The issue's targets (bf16, D=512), each with the measured number or why it is missing."""
    def find(peer, batch, dim=512, mode="fwd+bwd"):
        for row in rows:
            if (row["peer"], row["B"], row["D"], row["mode"]) == (peer, batch, dim, mode):
                return row
        return None

    def check(label, row, column, predicate, target):
        if row is None or row.get("status") != "ok" or column not in row:
            status = "missing" if row is None else row.get("status", "no peer to compare")
            return f"{label}: not measured ({status})"
        value = row[column]
        return f"{label}: {value:.2f} (target {target}) {'MET' if predicate(value) else 'NOT MET'}"

    largest = max([r["B"] for r in rows if r["peer"] == "triton" and r.get("status") == "ok" and r["D"] == 512],
                  default=None)
    lines = [check("B=65536 D=512 fwd+bwd time / 4-GEMM floor", find("triton", 65536), "ratio_to_floor",
                   lambda v: v <= 1.5, "<= 1.5"),
             check("B=32768 D=512 fwd+bwd speedup over open_clip", find("triton", 32768), "speedup_vs_open_clip",
                   lambda v: v >= 3, ">= 3"),
             check("B=32768 D=512 fwd+bwd speedup over Inf-CL", find("triton", 32768), "speedup_vs_inf_cl",
                   lambda v: v >= 2, ">= 2"),
             check("B=65536 D=512 extra peak memory / design bound", _memory_ratio(find("triton", 65536)),
                   "memory_ratio", lambda v: v <= 1.0, "<= 1"),
             check("cuda backend: B=65536 D=512 fwd+bwd time / 4-GEMM floor", find("cuda", 65536), "ratio_to_floor",
                   lambda v: v <= 2, "<= 2"),
             check("cuda backend: B=32768 D=512 fwd+bwd speedup over open_clip", find("cuda", 32768),
                   "speedup_vs_open_clip", lambda v: v >= 2, ">= 2")]
    lines.append(memory_margin_line(find("triton", 65536)))
    lines.append(f"largest B run by triton at D=512: {largest}")
    text = "\n".join(lines)
    (output / "clip_loss_gpu_summary.txt").write_text(text + "\n")
    return text


def memory_margin_line(row) -> str:
    """The B=65536 memory target spelled out: measured extra peak, each term of the bound, the margin."""
    if row is None or row.get("status") != "ok":
        return "B=65536 D=512 memory bound: not measured"
    return (f"B=65536 D=512 memory: extra peak {row['extra_peak_mb']:.1f} MiB <= bound {row['memory_bound_mb']:.1f} MiB "
            f"= 2 B D elt {row['bound_gradients_mb']:.1f} + workspace {row['bound_workspace_mb']:.1f} + 64 B "
            f"{row['bound_vectors_mb']:.1f}; margin {row['memory_margin_mb']:.1f} MiB "
            f"({100 * row['memory_margin_mb'] / row['memory_bound_mb']:.1f}% of the bound)")


def _memory_ratio(row):
    if row is None or row.get("status") != "ok":
        return row
    return {**row, "memory_ratio": row["extra_peak_mb"] / row["memory_bound_mb"]}


def _format(row: dict) -> str:
    head = f"{row['peer']:>9} {row['mode']:>7} B={row['B']:<6} D={row['D']:<4}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}"
    return (f"{head} {row['ms_median']:9.2f} ms  {row['tflops']:7.1f} TFLOP/s  "
            f"extra {row['extra_peak_mb']:9.1f} MiB (bound {row['memory_bound_mb']:.0f}, "
            f"margin {row['memory_margin_mb']:.1f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", nargs="?", type=Path, default=_results.RESULTS_DIR, help="folder for CSV/JSON/PNG")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--min-batch", type=int, default=4096)
    parser.add_argument("--max-batch", type=int, default=131072)
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=sorted(GEMMS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting new cases after this")
    parser.add_argument("--quick", action="store_true", help="D=512, B up to 16384")
    parser.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter at tiny sizes")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS, help="run only these peers")
    args = parser.parse_args(argv)
    if args.dry_run:  # before anything imports triton: the kernels then run on CPU tensors
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.dims, args.min_batch, args.max_batch, args.repeats = [32], 64, min(args.max_batch, 128), 2
    elif args.quick:
        args.dims, args.max_batch = [512], 16384
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        print("no CUDA device: use --dry-run to check the script on CPU (it measures nothing meaningful)")
        return 2
    batches = [b for b in (args.min_batch * 2**k for k in range(20)) if b <= args.max_batch]
    print(_results.environment_info())
    args.output.mkdir(parents=True, exist_ok=True)
    run(args.output, args.dims, batches, args.modes, device, getattr(torch, args.dtype), args.repeats, args.budget_s,
        args.peers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
