"""Both installs (`pip install .` and `pip install -e .`) import every subpackage; kernels ship as fastclip.kernels."""
from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import fastclip

REPO = Path(__file__).resolve().parents[1]

IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys, fastclip
names = [m.name for m in pkgutil.walk_packages(fastclip.__path__, "fastclip.")]
names += [m.name for m in pkgutil.walk_packages(importlib.import_module("fastclip.kernels").__path__, "fastclip.kernels.")]
names = sorted({n for n in names if not n.endswith("__main__")} | {"fastclip.kernels"})
for name in names:
    importlib.import_module(name)
print(fastclip.__file__)
print(len(names))
"""


def _module_names() -> list[str]:
    """Every module of the installed package, the kernels mapped in from kernels/ included (not __main__s)."""
    kernels = importlib.import_module("fastclip.kernels")
    names = [module.name for module in pkgutil.walk_packages(fastclip.__path__, "fastclip.")]
    names += [module.name for module in pkgutil.walk_packages(kernels.__path__, "fastclip.kernels.")]
    return sorted({name for name in names if not name.endswith("__main__")} | {"fastclip.kernels"})


def test_every_module_of_the_current_install_imports():
    names = _module_names()
    assert {"fastclip.loss", "fastclip.backends", "fastclip.ops.clip_loss", "fastclip.kernels"} <= set(names)
    for name in names:
        importlib.import_module(name)
    kernels = importlib.import_module("fastclip.kernels")
    assert Path(kernels.__file__).parent.name == "kernels"


def test_the_built_wheel_installs_and_imports_every_module(tmp_path):
    plain = {k: v for k, v in os.environ.items() if k != "FASTCLIP_BUILD_CUDA"}  # the default, pure-Python build
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(REPO)], check=True, capture_output=True, env=plain)
    wheel = next((tmp_path / "wheel").glob("fastclip-*.whl"))
    members = zipfile.ZipFile(wheel).namelist()
    assert "fastclip/kernels/__init__.py" in members
    assert not any(member.startswith("kernels/") for member in members), "a bare top-level kernels module shipped"
    assert not any(member.endswith((".so", ".pyd")) for member in members), "the plain wheel is pure Python"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    environment = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE], cwd=tmp_path, env=environment,
                            check=True, capture_output=True, text=True)
    installed_at, count = result.stdout.split()
    assert installed_at.startswith(str(tmp_path / "site"))
    assert int(count) >= len([name for name in _module_names() if name != "fastclip._C"])  # _C: the optional build


def test_fastclip_info_runs_as_a_command():
    result = subprocess.run([sys.executable, "-m", "fastclip", "info"], capture_output=True, text=True, check=True)
    assert "torch" in result.stdout and "auto ->" in result.stdout
    usage = subprocess.run([sys.executable, "-m", "fastclip", "nonsense"], capture_output=True, text=True)
    assert usage.returncode == 2 and "unknown subcommand" in usage.stderr


def test_a_plain_checkout_on_pythonpath_imports_its_own_kernels(tmp_path):
    """PYTHONPATH=<checkout> finds fastclip.kernels in that checkout's kernels/, even beside an install
    (this environment's) whose fastclip.kernels maps to another tree."""
    checkout = tmp_path / "checkout"
    for folder in ("fastclip", "kernels"):
        shutil.copytree(REPO / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    probe = ("import fastclip, fastclip.kernels.clip_loss as k; "
             "print(fastclip.__file__); print(fastclip.kernels.__file__); print(k.__file__)")
    environment = {**os.environ, "PYTHONPATH": str(checkout), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=environment, check=True,
                            capture_output=True, text=True)
    for line in result.stdout.split():
        assert line.startswith(str(checkout)), result.stdout
