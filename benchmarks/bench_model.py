"""Benchmark: CLIP training step (forward + backward) of fastclip vs open_clip, and tokenisation.

    python benchmarks/bench_model.py                 # quick CPU run (a few minutes), to a scratch folder
    python benchmarks/bench_model.py --update-results   # the same, appended to benchmarks/results/
    python benchmarks/bench_model.py --configs ViT-B-16 --batch 128 --device cuda --out-dir OUT   # GPU
    python benchmarks/bench_model.py --tokenizer-only

Output: ``--out-dir`` (default: a scratch folder under the system temp dir, printed at the end), or
``--update-results`` for benchmarks/results/: bench_model.csv/json (rows appended), bench_model.png.

Variants of one config: open_clip, and fastclip with each available ``attn_impl``, each with and
without gradient checkpointing. The step is ``zero_grad -> model(image, text) -> symmetric CLIP
loss -> backward`` with the same plain-PyTorch loss for both libraries, so only the model differs.
Step times come from one process per config that runs the variants round-robin (same weights, same
machine load for all: CPU machines here are shared); peak memory from a fresh process per variant.
On CPU each process uses one thread by default: with other jobs on the cores, OpenMP teams stall at
barriers whenever one thread is descheduled, which makes multi-threaded timings swing several-fold.

Columns: ms_median / ms_p20 / ms_p80 (step time), samples_per_s, peak_mb: memory of one step above
the model and inputs (CUDA: ``max_memory_allocated``; CPU: peak RSS in a second process whose
glibc mmap threshold is pinned low so freed tensors leave the RSS), saved_mb (bytes autograd saves
for backward outside checkpointed regions; not reported with checkpointing, whose block inputs it
cannot see). Tokenizer rows: texts/s of
``fastclip.tokenize`` and ``open_clip.tokenize`` on unique captions, ASCII-only or with unicode /
HTML entities / mojibake words mixed in, with cold caches and again warm.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _results  # noqa: E402
from _measure import (low_mmap_threshold, peak_memory, reset_peak_memory, run_case_in_subprocess,  # noqa: E402
                      summarize_times, synchronize, time_function)
from _results import append_results  # noqa: E402

NAME = "bench_model"
QUICK_CPU = [("fastclip-tiny", 64), ("ViT-B-32", 16)]
GPU_DEFAULT = [("ViT-B-16", 128), ("ViT-L-14", 64)]


# --------------------------------------------------------------------------------- one case (child)


def _build(case):
    import torch

    from fastclip.model import CONFIGS

    torch.manual_seed(0)
    if case["library"] == "open_clip":
        import open_clip

        if case["config"] in open_clip.list_models():
            model = open_clip.create_model(case["config"], pretrained=None)
        else:
            model = open_clip.model.CLIP(**CONFIGS[case["config"]].to_open_clip())
        model.set_grad_checkpointing(case["grad_checkpointing"])
        model.output_dict = True
    else:
        import fastclip

        model = fastclip.create_model(case["config"], attn_impl=case["attn_impl"],
                                      grad_checkpointing=case["grad_checkpointing"])
    return model.to(case["device"]).train()


def _inputs(case):
    import torch

    import fastclip
    from fastclip.model import CONFIGS

    config = CONFIGS[case["config"]]
    generator = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    images = torch.randn(case["batch"], 3, size, size, generator=generator)
    words = "a photo of red blue small large circle square dog cat on the grass with two three".split()
    rng = random.Random(0)
    captions = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 20))) for _ in range(case["batch"])]
    return images.to(case["device"]), fastclip.tokenize(captions).to(case["device"])


def _loss(output):
    import torch
    import torch.nn.functional as F

    if isinstance(output, dict):
        image, text, scale = output["image_features"], output["text_features"], output["logit_scale"]
    else:
        image, text, scale = output[:3]
    logits = scale * image @ text.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _saved_bytes(model, images, text) -> int:
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model(images, text))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def _autocast(case):
    import torch

    if case["device"].startswith("cuda") and case["amp"]:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _configure(model, variant) -> None:
    model.set_grad_checkpointing(variant["grad_checkpointing"])
    if variant["library"] == "fastclip":
        model.set_attn_impl(variant["attn_impl"])


def run_timing(case) -> dict:
    """Step times of every variant of one config, interleaved round-robin in one process.

    On a shared machine the load drifts; interleaving gives every variant the same conditions.
    The variants of one library share one model (same weights), switched per step.
    """
    import torch

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    device = case["device"]
    images, text = _inputs(case)
    models = {library: _build({**case, "library": library, "attn_impl": "auto", "grad_checkpointing": False})
              for library in sorted({v["library"] for v in case["variants"]})}
    autocast = _autocast(case)

    def step(variant):
        model = models[variant["library"]]
        _configure(model, variant)
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = _loss(model(images, text))
        loss.backward()
        model.zero_grad(set_to_none=True)

    samples = [[] for _ in case["variants"]]
    for _ in range(case["warmup"]):
        for variant in case["variants"]:
            timing = time_function(lambda: step(variant), device=device, warmup=0, repeats=1)
    for _ in range(case["repeats"]):
        for index, variant in enumerate(case["variants"]):
            timing = time_function(lambda: step(variant), device=device, warmup=0, repeats=1)
            samples[index].append(timing["ms_median"])
    rows = []
    for variant, times in zip(case["variants"], samples):
        timing = summarize_times(times)
        rows.append({**{k: v for k, v in case.items() if k not in ("variants", "op")}, **variant,
                     "op": "train_step", "status": "ok", **timing,
                     "samples_per_s": case["batch"] / (timing["ms_median"] / 1e3),
                     "parameters_m": sum(p.numel() for p in models[variant["library"]].parameters()) / 1e6})
    return {"rows": rows}


def run_memory(case) -> dict:
    """Peak memory of one step of one variant, in a fresh process (see the module docstring)."""
    import gc

    import torch

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    device = case["device"]
    model = _build(case)
    images, text = _inputs(case)
    autocast = _autocast(case)

    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = _loss(model(images, text))
        loss.backward()

    step()  # warm-up: lazy inits, kernel caches
    model.zero_grad(set_to_none=True)
    gc.collect()
    baseline = reset_peak_memory(device)  # CPU: the parent pinned a low mmap threshold (low_mmap_threshold)
    step()
    synchronize(device)
    peak = peak_memory(device) - baseline
    model.zero_grad(set_to_none=True)
    saved = None if case["grad_checkpointing"] else _saved_bytes(model, images, text) / 2 ** 20
    return {**case, "status": "ok", "peak_mb": peak / 2 ** 20, "saved_mb": saved}


# --------------------------------------------------------------------------------- tokenizer (child)


_ASCII_WORDS = ("a photo of the red blue green small large circle square triangle on with background cat dog "
                "running playing jumped colorful beautiful landscape sunset mountains 2 3 10, . !").split()
_UNICODE_WORDS = ("café naïve 東京 🐱 &amp; “quoted” ﬂuffy Ã©tÃ©").split()


def run_tokenizer_case(case) -> dict:
    """Texts/s of one library's tokenize on ``case["texts"]`` unique captions (cold), then again (warm)."""
    import fastclip
    import open_clip

    rng = random.Random(case["seed"])
    words = _ASCII_WORDS + (_UNICODE_WORDS if case["captions"] == "unicode" else [])
    captions = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + f" #{i}"
                for i in range(case["texts"])]
    tokenize = fastclip.tokenize if case["library"] == "fastclip" else open_clip.tokenize
    kwargs = {"truncate": True} if case["library"] == "fastclip" else {}
    tokenize(["warm up the vocabulary load"], **kwargs)
    start = time.perf_counter()
    tokenize(captions, **kwargs)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    tokenize(captions, **kwargs)
    warm = time.perf_counter() - start
    return {**case, "status": "ok", "cold_texts_per_s": case["texts"] / cold, "warm_texts_per_s": case["texts"] / warm}


# --------------------------------------------------------------------------------- driver (parent)


def _available_impls() -> list:
    from fastclip.model import describe_backends

    return [name for name, available, _ in describe_backends() if available]


def config_cases(configs, device, repeats, warmup, amp, threads) -> list:
    """One timing case per config; its variants: open_clip and each fastclip attn_impl, +/- checkpointing."""
    impls = _available_impls()
    cases = []
    for config, batch in configs:
        variants = []
        for grad_checkpointing in (False, True):
            variants.append({"library": "open_clip", "attn_impl": "open_clip", "grad_checkpointing": grad_checkpointing})
            variants += [{"library": "fastclip", "attn_impl": impl, "grad_checkpointing": grad_checkpointing}
                         for impl in impls]
        cases.append({"op": "time_config", "config": config, "batch": batch, "device": device, "repeats": repeats,
                      "warmup": warmup, "amp": amp, "threads": threads, "variants": variants})
    return cases


def run_config(script: Path, case: dict) -> list:
    """Timing (one process, interleaved) then memory (one fresh process per variant) of one config."""
    timing = run_case_in_subprocess(script, case)
    if "rows" not in timing:
        return [{**case, **variant, "op": "train_step", "status": timing.get("status", "failed")}
                for variant in case["variants"]]
    rows = timing["rows"]
    with low_mmap_threshold():  # the memory processes' peak RSS then tracks live tensors
        for row in rows:
            memory_case = {key: row[key] for key in ("config", "batch", "device", "amp", "threads", "library",
                                                     "attn_impl", "grad_checkpointing")}
            memory = run_case_in_subprocess(script, {**memory_case, "op": "memory"})
            row.update({key: memory.get(key) for key in ("peak_mb", "saved_mb")})
            if memory.get("status") != "ok":
                row["status"] = f"ok (memory: {memory.get('status')})"
            _print_row(row)
    return rows


def _print_row(row):
    if not str(row.get("status", "")).startswith("ok"):
        print(f"  {row.get('config')} {row.get('library')} {row.get('attn_impl')}: {row.get('status')}")
    elif row["op"] == "train_step":
        saved = f"{row['saved_mb']:7.1f}" if row.get("saved_mb") is not None else "      -"
        peak = f"{row['peak_mb']:8.1f}" if row.get("peak_mb") is not None else "       -"
        print(f"  {row['config']:<14} b={row['batch']:<4} {row['library']:<9} {row['attn_impl']:<9} "
              f"ckpt={str(row['grad_checkpointing']):<5} {row['ms_median']:9.1f} ms  "
              f"{row['samples_per_s']:8.1f}/s  peak {peak} MB  saved {saved} MB")
    else:
        print(f"  tokenize {row['library']:<9} {row['texts']} {row['captions']:<7} captions: "
              f"cold {row['cold_texts_per_s']:9.0f}/s  "
              f"warm {row['warm_texts_per_s']:9.0f}/s")


def plot(rows, output: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot")
        return None
    steps = [r for r in rows if r.get("op") == "train_step" and r.get("status") == "ok"]
    configs = sorted({(r["config"], r["batch"]) for r in steps}, key=str)
    if not steps:
        return None
    figure, axes = plt.subplots(len(configs), 2, figsize=(12, 3.6 * len(configs)), squeeze=False)
    for axis_row, (config, batch) in zip(axes, configs):
        subset = [r for r in steps if r["config"] == config and r["batch"] == batch]
        labels = [f"{r['library'] if r['library'] == 'open_clip' else r['attn_impl']}"
                  f"{' +ckpt' if r['grad_checkpointing'] else ''}" for r in subset]
        colors = ["tab:gray" if r["library"] == "open_clip" else "tab:blue" for r in subset]
        for axis, column, title in ((axis_row[0], "ms_median", "step time (ms, median, p20-p80)"),
                                    (axis_row[1], "peak_mb", "peak memory of a step (MB)")):
            values = [r[column] if isinstance(r.get(column), (int, float)) else 0 for r in subset]
            error = None
            if column == "ms_median":
                error = [[v - r["ms_p20"] for v, r in zip(values, subset)], [r["ms_p80"] - v for v, r in
                                                                              zip(values, subset)]]
            axis.barh(labels, values, color=colors, xerr=error)
            axis.set_title(f"{config}, batch {batch}, {subset[0]['device']}: {title}")
            axis.invert_yaxis()
            axis.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--configs", nargs="*", help="config names (default: quick CPU set or GPU set)")
    parser.add_argument("--batch", type=int, help="batch size for every config")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: 1 on CPU, see the module docstring; 0: torch's "
                             "default)")
    parser.add_argument("--no-amp", action="store_true", help="fp32 on GPU instead of bf16 autocast")
    parser.add_argument("--tokenizer-only", action="store_true")
    parser.add_argument("--no-tokenizer", action="store_true")
    parser.add_argument("--texts", type=int, default=20000, help="captions for the tokenizer rows")
    parser.add_argument("--no-save", action="store_true", help="print only; write no CSV/JSON/PNG")
    _results.add_output_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        runners = {"tokenize": run_tokenizer_case, "time_config": run_timing, "memory": run_memory}
        print(json.dumps(runners[case["op"]](case)))
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is None:
        args.threads = 0 if device.startswith("cuda") else 1
    defaults = GPU_DEFAULT if device.startswith("cuda") else QUICK_CPU
    configs = [(name, args.batch or dict(defaults).get(name, 8)) for name in args.configs] if args.configs \
        else [(name, args.batch or batch) for name, batch in defaults]
    script = Path(__file__).resolve()
    rows = []
    if not args.tokenizer_only:
        for case in config_cases(configs, device, args.repeats, args.warmup, not args.no_amp, args.threads):
            rows += run_config(script, case)
    if not args.no_tokenizer:
        for captions in ("ascii", "unicode"):
            for library in ("open_clip", "fastclip"):
                row = run_case_in_subprocess(script, {"op": "tokenize", "library": library, "captions": captions,
                                                      "texts": args.texts, "seed": 0})
                _print_row(row)
                rows.append(row)
    if not args.no_save:
        out = _results.output_dir(args)
        csv_path = append_results(NAME, rows, out)
        all_rows = json.loads((out / f"{NAME}.json").read_text())
        latest = [r for r in all_rows if r.get("date") == all_rows[-1].get("date")]
        png = plot(latest, out / f"{NAME}.png")
        print(f"results: {csv_path}" + (f", {png}" if png else ""))
    return 0


def test_bench_model_quick(benchmark=None):
    """pytest entry: the interleaved timing of one tiny config, in-process (the script is the benchmark)."""
    result = run_timing({"config": "fastclip-tiny", "batch": 4, "device": "cpu", "repeats": 1, "warmup": 0,
                         "amp": False, "threads": 0, "variants": [
                             {"library": "fastclip", "attn_impl": "sdpa", "grad_checkpointing": False},
                             {"library": "fastclip", "attn_impl": "math", "grad_checkpointing": True}]})
    assert [row["status"] for row in result["rows"]] == ["ok", "ok"]


if __name__ == "__main__":
    sys.exit(main())
