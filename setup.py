"""fastclip packaging.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and ship inside the
wheel as ``fastclip.kernels`` (``package_dir`` below), so there is never a bare ``kernels`` module; a
plain checkout on PYTHONPATH finds them there too (fastclip/__init__.py).

The CUDA C++ kernels (csrc/) are built only when asked, into ``fastclip._C``::

    FASTCLIP_BUILD_CUDA=1 pip install --no-build-isolation -e .

TORCH_CUDA_ARCH_LIST picks the archs ("7.5;8.0;9.0+PTX"; default: every arch >= 7.0 the local nvcc
builds, with PTX for the newest), MAX_JOBS the parallel compile jobs (default: bounded by cores and
free memory), NVCC_THREADS the archs one nvcc compiles at once. ``--no-build-isolation`` lets the build
see the installed torch. Without FASTCLIP_BUILD_CUDA the install is pure Python and never imports torch.
"""
import importlib.util
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
packages = find_packages(include=["fastclip", "fastclip.*"]) + ["fastclip.kernels"]


def read_version() -> str:
    """The one version string, fastclip/__init__.py's ``__version__``."""
    match = re.search(r'^__version__ = "([^"]+)"', (HERE / "fastclip" / "__init__.py").read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError("fastclip/__init__.py has no __version__ = \"...\" line")
    return match.group(1)


def cuda_extension():
    """(ext_modules, cmdclass) building fastclip._C, or nothing when FASTCLIP_BUILD_CUDA is unset."""
    if os.environ.get("FASTCLIP_BUILD_CUDA", "0").strip() in ("", "0"):
        return [], {}
    spec = importlib.util.spec_from_file_location("fastclip_cuda_toolkit", HERE / "fastclip" / "cuda_toolkit.py")
    toolkit = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = toolkit  # loaded by path: fastclip is not installed yet
    spec.loader.exec_module(toolkit)
    cuda_home = toolkit.find_cuda_home()
    if cuda_home is None:
        raise SystemExit("fastclip: FASTCLIP_BUILD_CUDA=1 needs the CUDA toolkit (nvcc): put nvcc on PATH or set CUDA_HOME")
    os.environ["CUDA_HOME"] = str(cuda_home)  # before torch.utils.cpp_extension reads it
    try:
        archs = toolkit.requested_archs(os.environ.get("TORCH_CUDA_ARCH_LIST"), toolkit.supported_archs(cuda_home),
                                        toolkit.nvcc_version(cuda_home))
        jobs = toolkit.max_jobs()
    except toolkit.ToolkitError as error:
        raise SystemExit(f"fastclip: {error}") from None
    os.environ["MAX_JOBS"] = str(jobs)
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        raise SystemExit("fastclip: FASTCLIP_BUILD_CUDA=1 builds against the installed torch: install torch first, "
                         f"then {toolkit.BUILD_COMMAND}") from None
    threads = os.environ.get("NVCC_THREADS", str(max(1, min(len(archs), 4))))
    print(f"fastclip: building fastclip._C with {cuda_home} for sm {', '.join(str(a) for a in archs)} "
          f"({jobs} jobs, {threads} nvcc threads)")
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", f"--threads={threads}", *toolkit.gencode_flags(archs)]
    ptx = toolkit.ptx_arch(archs)
    if ptx:
        nvcc_flags.append(f"-DFASTCLIP_PTX_ARCH={ptx}")
    extension = CUDAExtension(
        name="fastclip._C",
        sources=["csrc/binding.cpp", "csrc/clip_loss.cu", "csrc/siglip_loss.cu"],
        include_dirs=[str(HERE / "csrc")],
        extra_compile_args={"cxx": ["-O3", "-DFASTCLIP_PYTHON_MODULE"], "nvcc": nvcc_flags},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="fastclip",
    version=read_version(),
    description="Memory-linear fused CLIP/SigLIP losses, distributed loss, CLIP model and trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",  # torch 2.11 needs 3.10
    packages=packages,
    package_dir={"fastclip.kernels": "kernels"},
    package_data={"fastclip": ["assets/*"]},  # the CLIP BPE vocabulary and its licence
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        # The supported range (docs/gpu.md): the newest end is what CI runs, the oldest what
        # benchmarks/oldest_stack_check.sh tests (torch 2.11 / triton 3.6 / numpy >= 2.4).
        "torch>=2.11,<2.15",
        "numpy",
        "triton>=3.6,<3.9; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "torchvision",
        "pillow",
        "ftfy",
        "regex",
        "safetensors",
        "tqdm",
        "nvtx",
    ],
    extras_require={
        "train": ["webdataset", "tensorboard"],
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "open_clip_torch>=2.24",
            "matplotlib",
            "psutil",
            "webdataset",
            "tensorboard",
            "wandb",  # --report-to wandb, tested offline (WANDB_MODE=offline)
        ],
    },
    entry_points={"console_scripts": ["fastclip=fastclip.cli:main"]},
)
