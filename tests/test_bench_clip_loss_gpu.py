"""benchmarks/bench_clip_loss_gpu.py: its dry run (CPU, Triton interpreter) and its pytest-benchmark view (GPU)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_clip_loss_gpu.py"


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("bench_clip_loss_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_a_row_for_every_peer(bench, tmp_path):
    assert bench.main([str(tmp_path), "--dry-run", "--modes", "fwd+bwd", "--max-batch", "64",
                       "--budget-s", "60"]) == 0
    text = (tmp_path / "clip_loss_gpu.csv").read_text()
    for peer in bench.PEERS:
        assert f"{peer}," in text, f"no row for {peer}"
    assert (tmp_path / "clip_loss_gpu_summary.txt").read_text().startswith("B=65536")


@pytest.mark.gpu
def test_triton_clip_loss_fwd_bwd_gpu(bench, benchmark):
    step = bench.make_step("triton", bench.make_inputs(16384, 512, "cuda", torch.bfloat16), "fwd+bwd")
    step()
    benchmark(lambda: (step(), torch.cuda.synchronize()))


def test_memory_bound_is_spelled_out_with_its_margin(bench):
    # B = 65536, D = 512, bf16, the default 256 MiB workspace: 128 + 256 + 4 MiB
    terms = bench.memory_bound_terms(65536, 512, 2, 256 * 2**20)
    assert (terms["bound_gradients_mb"], terms["bound_workspace_mb"], terms["bound_vectors_mb"]) == (128, 256, 4)
    assert terms["memory_bound_mb"] == 388
    row = {"status": "ok", "extra_peak_mb": 384.5, **terms, "memory_margin_mb": 388 - 384.5}
    line = bench.memory_margin_line(row)
    assert "extra peak 384.5 MiB <= bound 388.0 MiB" in line and "margin 3.5 MiB (0.9% of the bound)" in line
    assert bench.memory_margin_line(None).endswith("not measured")
