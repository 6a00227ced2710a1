"""Benchmark: one full training step of fastclip's trainer vs open_clip's, samples/s and peak memory.

    python benchmarks/bench_train.py --quick           # CPU, a few minutes, to a scratch folder
    python benchmarks/bench_train.py --quick --update-results   # the same, appended to benchmarks/results/
    python benchmarks/bench_train.py --device cuda --configs ViT-B-32:256 ViT-B-16:128 --precision amp_bf16
    python benchmarks/bench_train.py --quick --torchcompile   # + fastclip-compiled (fastclip train --torchcompile)

Output: ``--out-dir`` (default: a scratch folder under the system temp dir, printed at the end), or
``--update-results`` for benchmarks/results/: bench_train.csv/json (rows appended), bench_train_<cpu|gpu>.png.
With ``--torchcompile`` the files are named bench_train_compile* instead (a separate table, never mixed
into the eager one).

A step is what each trainer does per batch: ``zero_grad -> model(image, text) -> contrastive loss ->
backward -> AdamW step -> clamp logit_scale``.

- fastclip: ``fastclip.create_model`` + ``fastclip.loss.ClipLoss`` + the trainer's own step
  (``fastclip.train.accumulation.forward_backward`` and ``loop.optimizer_update``: fused AdamW where
  torch has it, non-finite guard, tokens trimmed to the batch's longest caption as the loader does).
- fastclip-compiled (``--torchcompile``): the fastclip step with the model and the loss compiled by
  ``fastclip.train.compile.compile_model_and_loss`` (the trainer's ``--torchcompile``); the warm-up
  steps, which compile, are not timed.
- open_clip: ``open_clip`` model of the same config (same weights) + ``open_clip.ClipLoss`` + the
  step of ``open_clip_train/train.py`` (``torch.optim.AdamW`` with its default implementation, 77-token
  inputs as open_clip's tokenizer gives).

``--precision bf16`` / ``fp16`` mean what they mean in open_clip (and ``fastclip train``): the matmul
weights cast by ``convert_weights_to_lp`` in both libraries, images in that dtype, no autocast.

Same config, batch, precision and captions; with and without gradient checkpointing. Step times come
from one process per case that runs the two libraries round-robin (same machine load for both: CPU
machines here are shared; one thread per process by default, as in bench_model.py); peak memory from
a fresh process per variant (CUDA: max_memory_allocated; CPU: peak-RSS growth over one step, with
glibc's mmap threshold pinned low so freed tensors leave the RSS: ``_measure.low_mmap_threshold``).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _results  # noqa: E402
from _measure import (low_mmap_threshold, peak_memory, reset_peak_memory, run_case_in_subprocess,  # noqa: E402
                      summarize_times, synchronize, time_function)
from _results import append_results, plot_results  # noqa: E402

NAME = "bench_train"
QUICK_CPU = [("fastclip-tiny", 64), ("RN-Tiny", 128)]
FULL_CPU = QUICK_CPU + [("ViT-B-32", 16)]
LIBRARIES = ("fastclip", "fastclip-77tok", "open_clip")  # fastclip-77tok: same step on untrimmed tokens
COMPILE_LIBRARIES = ("fastclip", "fastclip-compiled", "open_clip")  # --torchcompile: eager beside compiled


def _captions(count: int) -> list[str]:
    rng = random.Random(0)
    words = "a photo of red blue small large circle square star on the gray white background in top left".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))) for _ in range(count)]


class TrainStep:
    """One library's model, loss and optimiser on fixed inputs; ``__call__`` runs one training step."""

    def __init__(self, case: dict, library: str):
        import torch

        import fastclip
        from fastclip.data.collate import trim_padding
        from fastclip.model import CONFIGS
        from fastclip.model.clip import convert_weights_to_lp
        from fastclip.precision import low_precision_dtype

        self.case, self.library = case, library
        self.device = torch.device(case["device"])
        config = CONFIGS[case["config"]]
        torch.manual_seed(0)
        reference = fastclip.create_model(case["config"], grad_checkpointing=case["grad_checkpointing"])
        size = config.vision.image_size
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(case["batch"], 3, size, size, generator=generator).to(self.device)
        tokens = fastclip.tokenize(_captions(case["batch"]))
        # bf16/fp16 (not the amp modes): open_clip's cast of the matmul weights in both libraries, and
        # images in that dtype (open_clip_train's get_input_dtype); the pure modes are not offered here.
        weight_dtype = low_precision_dtype(case["precision"])
        if weight_dtype is not None:
            self.images = self.images.to(weight_dtype)
        if library.startswith("fastclip"):
            from fastclip.loss import ClipLoss
            from fastclip.train.optim import build_optimizer

            self.model = reference.to(self.device)
            if weight_dtype is not None:
                convert_weights_to_lp(self.model, weight_dtype)
            self.loss = ClipLoss()
            self.optimizer, _ = build_optimizer(self.model, lr=1e-4, weight_decay=0.2)
            self.tokens = (tokens if library == "fastclip-77tok" else trim_padding(tokens)).to(self.device)
            if library == "fastclip-compiled":
                from fastclip.train.compile import compile_model_and_loss

                self.model, self.loss = compile_model_and_loss(self.model, self.loss)
        else:
            import open_clip

            model = open_clip.model.CLIP(**config.to_open_clip(), output_dict=True)
            model.load_state_dict(reference.state_dict())
            model.set_grad_checkpointing(case["grad_checkpointing"])
            self.model = model.to(self.device)
            if weight_dtype is not None:
                open_clip.model.convert_weights_to_lp(self.model, weight_dtype)
            self.loss = open_clip.ClipLoss()
            decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
            other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
            self.optimizer = torch.optim.AdamW([{"params": other, "weight_decay": 0.0},
                                                {"params": decay, "weight_decay": 0.2}], lr=1e-4)
            self.tokens = tokens.to(self.device)
        self.model.train()
        self.scaler = torch.amp.GradScaler(self.device.type) if case["precision"] == "amp" else None

    def __call__(self) -> None:
        import math

        import torch

        from fastclip.precision import autocast

        if self.library.startswith("fastclip"):
            from types import SimpleNamespace

            from fastclip.distributed.comm import World
            from fastclip.train.accumulation import forward_backward
            from fastclip.train.loop import optimizer_update
            from fastclip.train.optim import find_parameter

            loss = forward_backward(self.model, self.loss, self.images, self.tokens, precision=self.case["precision"],
                                    device=self.device, scaler=self.scaler)
            parts = SimpleNamespace(scaler=self.scaler, optimizer=self.optimizer, grad_clip_norm=None,
                                    trainable=list(self.model.parameters()), ctx=World(device=self.device),
                                    logit_scale=find_parameter(self.model, "logit_scale"))
            optimizer_update(parts, loss)
            return
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.case["precision"], self.device):
            output = self.model(self.images, self.tokens)
            loss = self.loss(output["image_features"], output["text_features"], output["logit_scale"])
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))


def _warmup_steps(library: str) -> int:
    """Untimed steps before measuring: one, or two when compiling (the first compiles, the second may
    recompile once for the then-known dynamic shapes)."""
    return 2 if library.endswith("compiled") else 1


def measure_memory(case: dict) -> dict:
    """Child process: peak memory of one step (after a warm-up step) above the state before it."""
    import gc

    step = TrainStep(case, case["library"])
    for _ in range(_warmup_steps(case["library"])):  # optimizer state, lazy inits, compilation
        step()
    step.model.zero_grad(set_to_none=True)
    gc.collect()
    base = reset_peak_memory(step.device)  # CPU: the parent pinned a low mmap threshold (low_mmap_threshold)
    step()
    synchronize(step.device)
    peak = peak_memory(step.device) - base
    return {**case, "peak_mb": peak / 2**20, "status": "ok"}


def measure_time(case: dict) -> list[dict]:
    """Child process: both libraries built side by side, timed round-robin. One row per library."""
    libraries = case["libraries"]
    steps = {library: TrainStep(case, library) for library in libraries}
    samples = {library: [] for library in libraries}
    for library in libraries:
        for _ in range(_warmup_steps(library)):  # allocator, lazy init, autotuning, compilation
            steps[library]()
    for _ in range(case["repeats"]):
        for library in libraries:
            samples[library].append(time_function(steps[library], device=case["device"], warmup=0, repeats=1))
    rows = []
    for library in libraries:
        timing = summarize_times([sample["ms_median"] for sample in samples[library]])
        rows.append({**case, "library": library, **timing,
                     "samples_per_s": case["batch"] / (timing["ms_median"] / 1e3), "status": "ok"})
    return rows


def _child(case: dict) -> None:
    threads = case.get("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if case["what"] == "memory":
        print(json.dumps(measure_memory(case)))
    else:
        print(json.dumps({"rows": measure_time(case), **case}))


def run(configs, *, device: str, precision: str, repeats: int, threads: int | None,
        libraries=LIBRARIES) -> list[dict]:
    script = Path(__file__).resolve()
    rows = []
    for config, batch in configs:
        for checkpointing in (False, True):
            case = {"config": config, "batch": batch, "device": device, "precision": precision,
                    "grad_checkpointing": checkpointing, "repeats": repeats, "threads": threads,
                    "libraries": list(libraries)}
            timing = run_case_in_subprocess(script, {**case, "what": "time"})
            if "rows" not in timing:
                print(f"{config} ckpt={checkpointing}: {timing.get('status')}")
                continue
            for row in timing["rows"]:
                with low_mmap_threshold():
                    memory = run_case_in_subprocess(script, {**case, "what": "memory", "library": row["library"]})
                row = {key: value for key, value in row.items() if key not in ("what", "rows", "libraries")}
                row["peak_mb"] = memory.get("peak_mb")
                rows.append(row)
            group = rows[-len(libraries):]
            reference = group[-1]
            for row in group:
                row["speedup_vs_open_clip"] = row["samples_per_s"] / reference["samples_per_s"]
                row["memory_vs_open_clip"] = (row["peak_mb"] / reference["peak_mb"]
                                              if row["peak_mb"] and reference["peak_mb"] else None)
            print(f"{config:<14} B={batch:<4} ckpt={str(checkpointing):<5} " + "  ".join(
                f"{row['library']} {row['samples_per_s']:6.1f}/s ({row['speedup_vs_open_clip']:.2f}x) "
                f"{row['peak_mb'] or float('nan'):5.0f} MB" for row in group), flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small CPU configs, few repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "amp", "amp_bf16", "bf16", "fp16"))
    parser.add_argument("--configs", nargs="*", default=None, help="NAME:BATCH ...")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (CPU default 1)")
    parser.add_argument("--torchcompile", action="store_true",
                        help="time fastclip eager beside fastclip compiled (model + loss, as fastclip train "
                             "--torchcompile) and open_clip; results go to bench_train_compile.*")
    _results.add_output_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.case:
        _child(json.loads(args.case))
        return 0
    if args.configs:
        configs = [(item.split(":")[0], int(item.split(":")[1])) for item in args.configs]
    else:
        configs = QUICK_CPU if args.quick or args.device == "cpu" else [("ViT-B-32", 256), ("ViT-B-16", 128)]
    threads = args.threads or (1 if args.device == "cpu" else None)
    repeats = args.repeats or (5 if args.quick else 9)
    libraries = COMPILE_LIBRARIES if args.torchcompile else LIBRARIES
    rows = run(configs, device=args.device, precision=args.precision, repeats=repeats, threads=threads,
               libraries=libraries)
    if not rows:
        return 1
    out = _results.output_dir(args)
    name = f"{NAME}_compile" if args.torchcompile else NAME
    path = append_results(name, rows, out)
    suffix = "cpu" if args.device == "cpu" else "gpu"
    for row in rows:
        row["variant"] = f"{row['library']}{' +ckpt' if row['grad_checkpointing'] else ''}"
        row["model_index"] = [config for config, _ in configs].index(row["config"]) + 1
    plot_results(rows, x="model_index", series="variant", log_x=False, output=out / f"{name}_{suffix}.png",
                 panels=[("samples_per_s", "training samples / s"), ("peak_mb", "peak memory of a step (MB)")],
                 title=f"training step, {args.precision}, {args.device}: "
                       + ", ".join(f"{i + 1}={c}:B{b}" for i, (c, b) in enumerate(configs)))
    print(f"results: {path}")
    return 0


# ------------------------------------------------------------------------------- pytest-benchmark


def _pytest_step(library: str):
    case = {"config": "fastclip-tiny", "batch": 32, "device": "cpu", "precision": "fp32",
            "grad_checkpointing": False}
    return TrainStep(case, library)


def test_train_step_fastclip(benchmark):
    benchmark(_pytest_step("fastclip"))


def test_train_step_open_clip(benchmark):
    benchmark(_pytest_step("open_clip"))


if __name__ == "__main__":
    sys.exit(main())
