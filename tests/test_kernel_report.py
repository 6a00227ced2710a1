"""The Triton kernels' default configs, compiled offline for sm80 and sm90 (benchmarks/kernel_report.py):
no spills, tensor cores in every S tile, 16-byte G stores; and the occupancy and roofline arithmetic.

The compile runs once, in a child process without TRITON_INTERPRET (this test process interprets
the kernels), about 10 compiles: well under a minute on two cores.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


report = _load("kernel_report")
roofline = report.roofline


@pytest.fixture(scope="module")
def default_rows(tmp_path_factory):
    reason = report.compiler_unavailable_reason()
    if reason:
        pytest.skip(f"cannot compile Triton kernels for NVIDIA GPUs here: {reason}")
    out = tmp_path_factory.mktemp("kernel_report")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment.pop("FASTCLIP_WORKSPACE_MB", None)
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "kernel_report.py"), "--defaults-only",
                                "--out-dir", str(out)], cwd=REPO, env=environment, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "not measured on GPU" in completed.stdout
    rows = json.loads((out / "kernel_report.json").read_text())
    assert (out / "kernel_report.csv").exists()
    return rows


def test_every_kernel_of_every_arch_is_compiled(default_rows):
    compiled = {(row["arch"], row["kernel"]) for row in default_rows}
    expected = {(arch, spec.name) for arch in report.ARCHS for spec in report.KERNELS}
    assert compiled == expected
    assert all(row["default"] for row in default_rows)
    stamp = default_rows[0]
    assert stamp["triton_compiler"] and stamp["ptxas"] and stamp["date"] and stamp["host"]


def test_default_configs_do_not_spill(default_rows):
    """The default of every declared config list, and the O(B) merge kernel (which has no config list)."""
    assert {row["kernel"] for row in default_rows} >= {"clip_loss_fwd", "clip_loss_bwd", "siglip_loss_fwd",
                                                       "siglip_loss_bwd", "lse_merge"}
    spilled = [(row["arch"], row["kernel"], row["registers"], row["local_bytes"], row["stack_bytes"],
                row["spill_instructions"]) for row in default_rows
               if row["local_bytes"] or row["stack_bytes"] or row["spill_instructions"]]
    assert not spilled, f"(arch, kernel, registers, local bytes, stack bytes, STL/LDL) that spill: {spilled}"
    assert all(0 < row["registers"] <= 255 and row["ctas_per_sm"] >= 1 for row in default_rows)


def test_s_tiles_run_on_tensor_cores(default_rows):
    for row in default_rows:
        if row["s_tiles"]:
            kinds = set(row["tensor_core_kind"].split("/"))
            allowed = {"HMMA"} if row["arch"] == "sm80" else {"HGMMA", "HMMA"}
            assert row["tensor_core_instructions"] > 0 and kinds <= allowed, row
        else:  # the merge kernel has no dot: the count tells the two apart
            assert row["tensor_core_instructions"] == 0, row
    assert any(row["tensor_core_kind"] == "HGMMA" for row in default_rows if row["arch"] == "sm90")


def test_g_stores_are_16_bytes_when_the_column_count_allows(default_rows):
    # the roofline case has n_cols = 65536 and a row stride of 65536: every 8-column group is aligned and whole
    widths = {(row["arch"], row["kernel"]): row["main_store_bytes"] for row in default_rows if row["writes_g"]}
    assert len(widths) == 4 and set(widths.values()) == {16}, widths


def test_store_width_is_read_from_the_opcode():
    assert [report.store_bytes(op) for op in ("STG.E.U16", "STG.E", "STG.E.64", "STG.E.128", "STG.E.U8")] == \
        [2, 4, 8, 16, 1]


def test_ctas_per_sm_from_registers_shared_memory_and_threads():
    # 234 regs -> 240 per thread (units of 256 per warp) x 256 threads = 61440 of 65536: one CTA
    assert report.ctas_per_sm(90, 234, 98304, 256) == (1, "registers")
    # 118 -> 120 x 256 = 30720: two CTAs; shared 2 x (99328 + 1024) fits sm90's 228 KiB
    assert report.ctas_per_sm(90, 118, 99328, 256) == (2, "registers")
    # the same shared memory on sm80 (164 KiB per SM): one CTA, by shared memory
    assert report.ctas_per_sm(80, 118, 99328, 256) == (1, "shared")
    # 32 registers x 1024 threads: 2 CTAs by registers, and by the 2048-thread limit
    assert report.ctas_per_sm(90, 32, 0, 1024)[0] == 2
    assert report.ctas_per_sm(90, 64, 300 * 1024, 128) == (0, "shared")  # more than a CTA may have


def test_roofline_terms(monkeypatch):
    monkeypatch.setenv("FASTCLIP_WORKSPACE_MB", "128")
    h200 = next(gpu for gpu in roofline.GPUS if gpu.name.startswith("H200"))
    floor_ms = 8 * 65536**2 * 512 / 989e12 * 1e3
    ideal = roofline.TileKernel(128, 128, 256, 2, mufu=0.0, fp32=0.0, stores=0.0)
    result = roofline.estimate(h200, ideal, ideal, roofline.SCENARIOS[0])
    assert result["floor_ms"] == pytest.approx(floor_ms) and floor_ms == pytest.approx(17.79, abs=0.01)
    assert result["chunk"] == 1024 and result["chunks"] == 64  # 128 MiB / (65536 columns x 2 bytes)
    assert result["terms"]["fwd kernel"]["ms"] == pytest.approx(floor_ms / 4)  # no epilogue: the MMA alone
    # grad_text: 63 adds that each read 2 and write 1 fp32 (65536, 512) arrays
    assert result["terms"]["grad_text fp32 adds"]["ms"] == pytest.approx(63 * 3 * 65536 * 512 * 4 / 4.8e12 * 1e3)
    in_gemm = roofline.estimate(h200, ideal, ideal, roofline.SCENARIOS[1])
    assert in_gemm["terms"]["grad_text fp32 adds"]["ms"] == 0 and in_gemm["total_ms"] < result["total_ms"]
    # one CTA per SM: the epilogue adds to the MMA; two: it hides behind another CTA's MMA
    busy = roofline.TileKernel(128, 128, 256, 1, mufu=2.0, fp32=16.0, stores=1.0)
    epilogue_ms = 65536**2 * (2 / 16 + 16 / 128 + 1 / 32) / (132 * 1.98e9) * 1e3
    serial = roofline.estimate(h200, busy, ideal, roofline.SCENARIOS[0])["terms"]["fwd kernel"]
    assert serial["epilogue"] == pytest.approx(epilogue_ms) and serial["ms"] == pytest.approx(floor_ms / 4 + epilogue_ms)
    overlapped = roofline.estimate(h200, roofline.replace(busy, ctas_per_sm=2), ideal, roofline.SCENARIOS[0])
    assert overlapped["terms"]["fwd kernel"]["ms"] == pytest.approx(max(floor_ms / 4, epilogue_ms))


def test_roofline_l2_term_counts_operand_bytes(monkeypatch):
    monkeypatch.setenv("FASTCLIP_WORKSPACE_MB", "128")
    h100 = next(gpu for gpu in roofline.GPUS if gpu.name.startswith("H100"))
    assert 30 < h100.l2_bytes / (h100.sms * h100.clock_hz) < 40  # tens of bytes per clock per SM (sources in roofline.py)
    tile = roofline.TileKernel(64, 128, 128, 2, mufu=0.0, fp32=0.0, stores=0.0)
    square = 65536.0**2 * 512 * 2
    assert roofline.operand_bytes(tile) == pytest.approx(square * (1 / 64 + 1 / 128))
    assert roofline.operand_bytes(tile, resident_rows=True) == pytest.approx(65536 * 512 * 2 + square / 64)
    without, with_l2 = (roofline.estimate(h100, tile, tile, roofline.SCENARIOS[index]) for index in (1, 4))
    assert not without["terms"]["fwd kernel"]["l2"]
    assert with_l2["terms"]["fwd kernel"]["l2"] == pytest.approx(square * (3 / 128) / h100.l2_bytes * 1e3)
    assert with_l2["terms"]["fwd kernel"]["ms"] == pytest.approx(with_l2["terms"]["fwd kernel"]["l2"])  # L2-bound
    # a row block too large for one SM's shared memory next to its column pipeline cannot be resident
    huge = roofline.TileKernel(512, 128, 128, 1, mufu=0.0, fp32=0.0, stores=0.0)
    assert roofline.estimate(h100, huge, tile, roofline.SCENARIOS[6]) is None


def test_a_report_is_a_snapshot(tmp_path):
    common = report._results
    common.write_snapshot("kernel_report", [], tmp_path, stamped=[{"arch": "sm90", "kernel": "k"}])
    common.write_snapshot("kernel_report", [], tmp_path, stamped=[{"arch": "sm90", "kernel": "k"}])
    assert len(json.loads((tmp_path / "kernel_report.json").read_text())) == 1
    assert (tmp_path / "kernel_report.csv").read_text().count("sm90,k") == 1
