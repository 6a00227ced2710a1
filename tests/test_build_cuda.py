"""The optional CUDA build: toolkit helpers, the compiled kernels' SASS, and what users see without it.

The SASS test reads the installed fastclip._C with cuobjdump (the Triton wheel ships one): it is skipped
when the extension is not built, unless FASTCLIP_REQUIRE_CUDA_BUILD=1 (CI builds it, so there a missing
build fails). No GPU is needed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastclip import cuda_toolkit
from fastclip.cuda_toolkit import Arch, ToolkitError

REPO = Path(__file__).resolve().parents[1]
TENSOR_CORE_PATHS = {"half_mma": (7, 0), "bf16_mma": (8, 0), "tf32_mma": (8, 0)}  # path -> first arch
STATIC_SHARED_LIMIT = 48 * 1024  # above it a kernel needs an opt-in, and T4 has 64 KB per SM in all


def built_library() -> Path:
    library = cuda_toolkit.built_extension()
    if library is None:
        if os.environ.get("FASTCLIP_REQUIRE_CUDA_BUILD", "0") not in ("", "0"):
            pytest.fail(f"FASTCLIP_REQUIRE_CUDA_BUILD=1 but fastclip._C is not built: {cuda_toolkit.BUILD_COMMAND}")
        pytest.skip(f"fastclip._C is not built ({cuda_toolkit.BUILD_COMMAND})")
    return library


def built_library_and_cuobjdump() -> Path:
    library = built_library()
    if cuda_toolkit.cuobjdump() is None:
        pytest.skip("no cuobjdump (pip install triton ships one)")
    return library


def test_built_kernels_use_tensor_cores_and_never_spill():
    from fastclip.ops import cuda_common

    rows = cuda_toolkit.kernel_resources(built_library_and_cuobjdump())
    archs = sorted({row["arch"] for row in rows})
    assert archs == sorted(f"sm_{a}" for a in cuda_common.build_info()["archs"]), "SASS and build_info disagree"
    tiles = [row for row in rows if row["kernel"] != "stats_merge_kernel"]
    assert len(tiles) == len(archs) * 5 * 5, "5 tile kernels (fwd x2, grad, siglip fwd/grad) x 5 paths per arch"
    for row in rows:
        name = f"{row['arch']} {row['kernel']} {row['path']} {row['expectations']}"
        assert row["local_bytes"] == 0 and row["spill_instructions"] == 0, f"{name} spills to local memory"
        assert row["shared_bytes"] <= STATIC_SHARED_LIMIT, f"{name} needs {row['shared_bytes']} B of shared memory"
    for row in tiles:
        name = f"{row['arch']} {row['kernel']} {row['path']} {row['expectations']}"
        arch = (int(row["arch"][3:-1]), int(row["arch"][-1]))
        compiled = row["path"] != "bf16_fma" if arch >= (8, 0) else row["path"] in ("half_mma", "float_fma", "bf16_fma")
        assert row["trap_only"] == (not compiled), f"{name}: compiled body and csrc/tile_math.h path_compiled disagree"
        if row["path"] in TENSOR_CORE_PATHS and compiled:
            assert row["hmma"] >= 16, f"{name}: the S-tile product does not run on tensor cores (HMMA)"
        if row["path"].endswith("fma"):
            assert row["hmma"] == 0, f"{name}: the exact-FMA path uses tensor cores"
        if compiled:
            assert row["registers"] <= (255 if row["path"] == "tf32_mma" else 128), f"{name}: {row['registers']} registers"


def test_kernel_report_writes_to_a_scratch_folder(tmp_path):
    library = built_library_and_cuobjdump()
    committed = REPO / "benchmarks" / "results" / "kernel_report_cuda.csv"
    before = committed.read_bytes() if committed.exists() else None
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_report_cuda.py"), "--library",
                             str(library), "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (tmp_path / "kernel_report_cuda.csv").read_text().splitlines()
    assert lines[0].startswith("arch,kernel,path,expectations,registers,shared_bytes,local_bytes")
    assert any(",half_mma," in line for line in lines[1:])
    assert (committed.read_bytes() if committed.exists() else None) == before, "the committed report was rewritten"


def test_built_ops_return_what_the_custom_ops_and_their_fakes_declare():
    """The binding's schemas (fastclip._C loads without a GPU) against the Python custom ops that wrap them:
    clip_loss_fwd returns the four statistics and positive_logit, clip_loss_bwd (grad_image, grad_text,
    grad_scale), in both (the fakes: test_fake_kernels_*)."""
    built_library()
    from fastclip.ops import clip_loss_cuda, cuda_common, siglip_loss_cuda

    extension = cuda_common.extension()
    returns = {}
    for op in (clip_loss_cuda.clip_loss_fwd, clip_loss_cuda.clip_loss_bwd, siglip_loss_cuda.siglip_loss_fwd,
               siglip_loss_cuda.siglip_loss_bwd):
        built = getattr(extension, op._name.removesuffix("_cuda")).default._schema
        assert len(built.returns) == len(op._opoverload._schema.returns), f"{op._name}: binding and custom op disagree"
        returns[op._name] = len(built.returns)
    assert returns == {"clip_loss_fwd_cuda": 5, "clip_loss_bwd_cuda": 3, "siglip_loss_fwd_cuda": 1,
                       "siglip_loss_bwd_cuda": 3}


def test_arch_list_parsing_and_the_errors_that_name_the_fix():
    supported = [Arch(7, 5), Arch(8, 0), Arch(8, 6), Arch(9, 0), Arch(12, 0)]
    default = cuda_toolkit.requested_archs(None, supported)
    assert default == [Arch(7, 5), Arch(8, 0), Arch(8, 6), Arch(9, 0), Arch(12, 0, ptx=True)]
    assert cuda_toolkit.requested_archs("7.5;8.0 9.0+PTX", supported) == [Arch(7, 5), Arch(8, 0), Arch(9, 0, ptx=True)]
    assert cuda_toolkit.gencode_flags([Arch(7, 5), Arch(9, 0, ptx=True)]) == [
        "-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    assert cuda_toolkit.ptx_arch(default) == "1200"
    with pytest.raises(ToolkitError, match="CUDA 12.x or older"):
        cuda_toolkit.requested_archs("7.0;8.0", supported, toolkit=(13, 0))
    with pytest.raises(ToolkitError, match="tensor cores"):
        cuda_toolkit.requested_archs("6.1", supported)
    with pytest.raises(ToolkitError, match="does not build sm_100"):
        cuda_toolkit.requested_archs("10.0", supported)
    with pytest.raises(ToolkitError, match="is not an arch"):
        cuda_toolkit.requested_archs("Volta", supported)


def test_max_jobs_honours_max_jobs_and_free_memory(monkeypatch):
    monkeypatch.setenv("MAX_JOBS", "3")
    assert cuda_toolkit.max_jobs() == 3
    monkeypatch.setenv("MAX_JOBS", "zero")
    with pytest.raises(ToolkitError, match="MAX_JOBS"):
        cuda_toolkit.max_jobs()
    monkeypatch.delenv("MAX_JOBS")
    monkeypatch.setattr(cuda_toolkit, "_free_memory_gb", lambda: 2 * cuda_toolkit.NVCC_MEMORY_GB + 0.1)
    monkeypatch.setattr(cuda_toolkit.os, "cpu_count", lambda: 16)
    assert cuda_toolkit.max_jobs() == 2, "16 cores but memory for two nvcc jobs"


def test_cuda_home_is_the_toolkit_behind_an_nvcc_wrapper(monkeypatch, tmp_path):
    home = cuda_toolkit.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit here")
    wrapper = tmp_path / "nvcc"
    wrapper.write_text(f"#!/bin/sh\nexec {home / 'bin' / 'nvcc'} \"$@\"\n")
    wrapper.chmod(0o755)
    assert cuda_toolkit.toolkit_root(str(wrapper)) == home
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert cuda_toolkit.find_cuda_home() == home
    assert (7, 5) <= min((a.major, a.minor) for a in cuda_toolkit.supported_archs(home))


def test_plain_install_is_pure_python_and_the_version_has_one_source():
    import fastclip

    script = ("import runpy, sys; sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py'); "
              "print('torch' in sys.modules)")
    environment = {k: v for k, v in os.environ.items() if k != "FASTCLIP_BUILD_CUDA"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=environment, capture_output=True, text=True,
                            check=True)
    version, imported_torch = result.stdout.split()[-2:]
    assert version == fastclip.__version__ and imported_torch == "False"


def test_a_build_request_the_toolkit_cannot_serve_fails_with_the_fix():
    if cuda_toolkit.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit here")
    environment = {**os.environ, "FASTCLIP_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "6.0"}
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, env=environment, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "sm_70 (V100) or newer" in result.stderr and "Traceback" not in result.stderr


def test_importing_fastclip_loads_and_queries_nothing():
    script = ("import sys, fastclip, fastclip.loss, fastclip.backends, fastclip.ops.clip_loss_cuda, "
              "fastclip.ops.siglip_loss_cuda, fastclip.info; import torch; "
              "print('fastclip._C' in sys.modules, torch.cuda.is_initialized())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_info_says_what_is_built_in_user_words():
    result = subprocess.run([sys.executable, "-m", "fastclip", "info"], capture_output=True, text=True, check=True)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("CUDA kernels (backend='cuda'):")]
    assert "built for sm" in line or f"not built: {cuda_toolkit.BUILD_COMMAND}" in line
    assert "issue" not in result.stdout.lower()


def test_a_missing_extension_says_how_to_build_it(monkeypatch):
    from fastclip.ops import cuda_common

    real_find_spec = cuda_common.importlib.util.find_spec
    monkeypatch.setattr(cuda_common.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "fastclip._C" else real_find_spec(name, *rest))
    cuda_common._load.cache_clear()
    try:
        assert cuda_common.install_reasons() == (f"the CUDA kernels are not built: {cuda_common.BUILD_COMMAND}",)
        with pytest.raises(RuntimeError, match="FASTCLIP_BUILD_CUDA=1 pip install"):
            cuda_common.extension()
    finally:
        monkeypatch.undo()
        cuda_common._load.cache_clear()
