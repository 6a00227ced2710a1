"""fastclip packaging.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and ship inside the
wheel as ``fastclip.kernels`` (``package_dir`` below), so there is never a bare ``kernels`` module.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastclip", "fastclip.*"]) + ["fastclip.kernels"]

setup(
    name="fastclip",
    version="0.1.0",
    description="Memory-linear fused CLIP/SigLIP losses, distributed loss, CLIP model and trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=packages,
    package_dir={"fastclip.kernels": "kernels"},
    package_data={"fastclip": ["assets/*"]},  # the CLIP BPE vocabulary and its licence
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
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
        ],
    },
    entry_points={"console_scripts": ["fastclip=fastclip.cli:main"]},
)
