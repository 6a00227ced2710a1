"""Benchmarks write to a scratch folder unless asked to update benchmarks/results/ (never the checkout)."""
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = ["bench_clip_loss", "bench_siglip_loss", "bench_model", "bench_train", "bench_distributed_loss"]


def _load(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def _git_status() -> str:
    completed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                               capture_output=True, text=True)
    if completed.returncode != 0:
        pytest.skip(f"not a git checkout: {completed.stderr.strip()}")
    return completed.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_output_folder_flags(name, tmp_path):
    common = _load("_results")
    parser = _load(name).build_parser()
    default = common.output_dir(parser.parse_args([]))
    assert default == common.scratch_dir() and REPO not in default.resolve().parents
    assert common.output_dir(parser.parse_args(["--update-results"])) == BENCHMARKS / "results"
    assert common.output_dir(parser.parse_args(["--out-dir", str(tmp_path)])) == tmp_path
    with pytest.raises(SystemExit) as error:  # argparse: the two flags exclude each other
        parser.parse_args(["--out-dir", str(tmp_path), "--update-results"])
    assert error.value.code == 2


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_quick_benchmark_leaves_the_checkout_clean(tmp_path):
    """A --quick run with no output flag writes its CSV/JSON/PNG to the scratch folder only; its two
    implementations computed the same loss (open_clip's value), so the timing compares like with like."""
    pytest.importorskip("open_clip")
    before = _git_status()
    environment = {**os.environ, "TMPDIR": str(tmp_path)}  # the scratch folder lives under the temp dir
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_siglip_loss.py"), "--quick", "--batches", "96", "--dim", "40",
         "--modes", "fwd+bwd", "--repeats", "1"], cwd=REPO, env=environment, capture_output=True, text=True,
        timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert _git_status() == before, "the benchmark changed the checkout"
    (scratch,) = tmp_path.glob("fastclip-benchmarks-*")  # the run's own folder under the temp dir
    rows = json.loads((scratch / "bench_siglip_loss.json").read_text())
    assert (scratch / "bench_siglip_loss.csv").is_file()
    assert {row["implementation"]: row["status"] for row in rows} == {"fastclip": "ok", "open_clip": "ok"}
    losses = {row["implementation"]: row["loss"] for row in rows}
    assert losses["fastclip"] == pytest.approx(losses["open_clip"], rel=1e-5)
    fastclip_row = next(row for row in rows if row["implementation"] == "fastclip")
    assert fastclip_row["time_vs_open_clip"] > 0 and fastclip_row["extra_peak_mb"] >= 0
    assert {"date", "torch", "cpu"} <= set(fastclip_row)


def test_each_run_gets_its_own_scratch_folder_with_normal_permissions(tmp_path):
    """Two runs never share a scratch folder, and what they write is readable as any user file is
    (umask 022 here: 0644 files, 0755 folders), not the 0600 of a private temporary."""
    environment = {**os.environ, "TMPDIR": str(tmp_path)}
    script = ("import argparse, sys; sys.path.insert(0, sys.argv[1]); import _results; "
              "parser = argparse.ArgumentParser(); _results.add_output_arguments(parser); "
              "out = _results.output_dir(parser.parse_args([])); "
              "print(_results.append_results('probe', [{'value': 1}], out))")
    folders = []
    for _ in range(2):
        completed = subprocess.run([sys.executable, "-c", f"import os; os.umask(0o022); {script}", str(BENCHMARKS)],
                                   env=environment, capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stderr[-3000:]
        csv_path = Path(completed.stdout.strip().splitlines()[-1])
        folders.append(csv_path.parent)
        assert csv_path.parent.parent == tmp_path and csv_path.parent.name.startswith("fastclip-benchmarks-")
        for written in (csv_path, csv_path.with_suffix(".json")):
            assert stat.S_IMODE(written.stat().st_mode) == 0o644, f"{written.name}: {oct(written.stat().st_mode)}"
        assert stat.S_IMODE(csv_path.parent.stat().st_mode) == 0o755
        assert len(json.loads(csv_path.with_suffix(".json").read_text())) == 1, "a run sees only its own rows"
    assert folders[0] != folders[1], "two runs wrote into one scratch folder"


def test_the_tuning_stage_times_a_config_of_every_kernel_in_its_dry_run(tmp_path):
    """benchmarks/tune_tiles.py calls the Triton launchers' private entry points: a launcher whose signature
    changed must fail here, not only in the GPU script's dry run (an error is recorded, not raised)."""
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tune_tiles.py"), str(tmp_path), "--dry-run"],
                               env=environment, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (written,) = tmp_path.glob("tuned_tiles_*.json")
    tables = json.loads(written.read_text())["kernels"]
    assert len(tables) == 5, sorted(tables)
    for name, entry in tables.items():
        assert entry["fastest"] is not None and entry["fastest_ms"] > 0, (name, entry)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_train_step_runs_in_both_libraries_with_open_clips_weight_dtypes(precision):
    """bench_train's step (the trainer's optimizer_update for fastclip, open_clip_train's for open_clip)
    runs, and --precision bf16 casts the same tensors in both, as open_clip's convert_weights_to_lp does
    (it once ran both in fp32 under the bf16 label, and the fastclip step once failed on its stand-in world)."""
    import torch

    bench_train = _load("bench_train")
    case = {"config": "fastclip-tiny", "batch": 4, "device": "cpu", "precision": precision,
            "grad_checkpointing": False}
    dtypes = {}
    for library in ("fastclip", "open_clip"):
        step = bench_train.TrainStep(case, library)
        step()
        dtypes[library] = {name: parameter.dtype for name, parameter in step.model.named_parameters()}
        assert step.images.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert dtypes["fastclip"] == dtypes["open_clip"]
    assert (torch.bfloat16 in dtypes["fastclip"].values()) == (precision == "bf16")
    assert torch.float32 in dtypes["fastclip"].values()  # LayerNorm and the embeddings stay fp32
