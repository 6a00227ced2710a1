"""Tuning stage of the one-call GPU script: time every declared tile config of each Triton kernel.

    python benchmarks/tune_tiles.py OUT_DIR [--budget-s 120]      # on a GPU (sm80 / sm90 lists)
    python benchmarks/tune_tiles.py OUT_DIR --dry-run               # CPU interpreter, tiny shapes (plumbing)
    python benchmarks/tune_tiles.py --defaults A.json [B.json ...]  # print the defaults these runs choose

For each kernel (the rows of TABLES: a config table of kernels/*.py and the launcher call that runs
it), at the benchmark's shape (CLIP: B = 65536, D = 512; SigLIP: B = 65536, D = 768; bf16), every
config of this GPU's architecture list is timed with triton.testing.do_bench on the launcher's own
entry point (the kernel plus its merge / GEMM steps), and the fastest is recorded. A config that
cannot launch (shared memory on a smaller sm8x part) is recorded with its error. OUT_DIR/
tuned_tiles_<arch>.json is rewritten after every kernel, so a run stopped at its limit keeps what it
finished. ``--defaults`` turns one or more such files (e.g. an sm80 and an sm90 run) into the
``with_default_first(...)`` lines of kernels/clip_loss.py and kernels/siglip_loss.py: a later commit
pastes them (nothing here edits the kernels).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _results  # noqa: E402

# (defaults table, module of the table, launcher, with_expectations) -> timed at (batch, dim)
TABLES = (
    ("CLIP_FWD_CONFIGS", "clip_loss", "clip_fwd", False),
    ("CLIP_FWD_EXPECTATION_CONFIGS", "clip_loss", "clip_fwd", True),
    ("CLIP_BWD_CONFIGS", "clip_loss", "clip_bwd", False),
    ("SIGLIP_FWD_CONFIGS", "siglip_loss", "siglip_fwd", False),
    ("SIGLIP_BWD_CONFIGS", "siglip_loss", "siglip_bwd", False),
)
SHAPES = {"clip_loss": (65536, 512), "siglip_loss": (65536, 768)}
DRY_RUN_SHAPE = (96, 40)
DTYPE = "bfloat16"


def _inputs(batch: int, dim: int, device: str, dtype):
    import torch
    import torch.nn.functional as F

    generator = torch.Generator(device=device).manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=-1).to(dtype)
    text = F.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=-1).to(dtype)
    scale = torch.tensor(1 / 0.07, device=device)
    bias = torch.tensor(-1.0, device=device)
    return image, text, scale, bias


def launcher(kind: str, with_expectations: bool, image, text, scale, bias):
    """config -> one call of the launcher's entry point for this kernel (inputs prepared once)."""
    import torch

    from fastclip.ops import clip_loss_triton, siglip_loss_triton

    batch = image.shape[0]
    if kind == "clip_fwd":
        return lambda config: clip_loss_triton._forward(image, text, scale, bias, with_expectations, 0, True, config)
    if kind == "clip_bwd":
        row_lse, col_lse, _, _, _ = clip_loss_triton.clip_loss_fwd(image, text, scale, bias, False, 0, False)
        coef = torch.full((batch,), 0.5 / batch, device=image.device)
        stats = (row_lse, col_lse, coef, coef)
        return lambda config: clip_loss_triton._backward(image, text, scale, bias, stats, 0, config)
    if kind == "siglip_fwd":
        return lambda config: siglip_loss_triton._forward(image, text, scale, bias, 0, config)
    grad_coef = torch.tensor(1.0 / batch, device=image.device)
    return lambda config: siglip_loss_triton._backward(image, text, scale, bias, 0, grad_coef, config)


def _time(run, config, device: str) -> float:
    if device == "cpu":  # the dry run: one call, wall clock
        start = time.perf_counter()
        run(config)
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(lambda: run(config), warmup=10, rep=40)


def tune(out_dir: Path, budget_s: float, dry_run: bool) -> dict:
    import importlib

    import torch

    from fastclip.ops import triton_common

    device = "cpu" if dry_run else "cuda"
    arch = triton_common.architecture(torch.device(device))
    dtype = getattr(torch, DTYPE)
    started = time.monotonic()
    path = out_dir / f"tuned_tiles_{arch}.json"
    result = {"arch": arch, "dtype": DTYPE, "dry_run": dry_run, **_results.environment_info(), "kernels": {}}
    for table, module_name, kind, with_expectations in TABLES:
        if time.monotonic() - started > budget_s:
            result["kernels"][table] = {"skipped": f"the {budget_s:.0f} s budget was spent"}
            continue
        configs = getattr(importlib.import_module(f"fastclip.kernels.{module_name}"), table)[arch]
        batch, dim = DRY_RUN_SHAPE if dry_run else SHAPES[module_name]
        inputs = _inputs(batch, dim, device, dtype)
        run = launcher(kind, with_expectations, *inputs)
        timings = []
        for index, config in enumerate(configs):
            entry = {"config": [config.block_m, config.block_n, config.block_d, config.num_warps, config.num_stages],
                     "default": index == 0}
            try:
                entry["ms"] = _time(run, config, device)
            except Exception as error:  # noqa: BLE001 - record it (e.g. out of shared memory), time the rest
                entry["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            timings.append(entry)
            print(f"{arch} {table} {entry['config']}: {entry.get('ms', entry.get('error'))}", flush=True)
        timed = [entry for entry in timings if "ms" in entry]
        record = {"batch": batch, "dim": dim, "timings": timings}
        if timed:
            fastest = min(timed, key=lambda entry: entry["ms"])
            default = timings[0].get("ms")
            record.update(fastest=fastest["config"], fastest_ms=fastest["ms"],
                          speedup_over_default=(default / fastest["ms"]) if default else None)
        result["kernels"][table] = record
        del inputs, run
        path.write_text(json.dumps(result, indent=1))
    path.write_text(json.dumps(result, indent=1))
    print(f"tuned tile configs -> {path}")
    return result


def defaults_code(paths: list[Path]) -> str:
    """The with_default_first(...) lines of the kernels' defaults tables, from tuned_tiles_<arch>.json files."""
    fastest: dict[str, dict[str, list]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if data.get("dry_run"):
            continue
        for table, record in data["kernels"].items():
            if "fastest" in record:
                fastest.setdefault(table, {})[data["arch"]] = record["fastest"]
    lines = []
    for table, by_arch in fastest.items():
        cells = ", ".join(f'"{arch}": TileConfig({", ".join(str(v) for v in config)})'
                          for arch, config in sorted(by_arch.items(), reverse=True))
        lines.append(f"{table}: {{{cells}}}")
    return "\n".join(lines) if lines else "no GPU timings in these files"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path)
    parser.add_argument("--budget-s", type=float, default=120.0, help="no new kernel starts after this")
    parser.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes")
    parser.add_argument("--defaults", nargs="+", type=Path, help="print the defaults of tuned_tiles_*.json files")
    args = parser.parse_args(argv)
    if args.defaults:
        print(defaults_code(args.defaults))
        return 0
    if args.out_dir is None:
        parser.error("give OUT_DIR (or --defaults FILE...)")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run (the interpreter, tiny shapes)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tune(args.out_dir, args.budget_s, args.dry_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
