"""``fastclip info``: which loss backends and attention kernels can run here, and why the others cannot."""
from __future__ import annotations

import argparse
import importlib
import platform

import torch

from fastclip.backends import AUTO_PRIORITY, BACKENDS, LossInputs, select_backend


def _probe_devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    return devices


def _versions() -> list[str]:
    from fastclip import __version__

    lines = [f"fastclip {__version__}, python {platform.python_version()}, torch {torch.__version__}"]
    for module in ("triton", "open_clip", "xformers"):
        try:
            lines.append(f"{module} {importlib.import_module(module).__version__}")
        except ImportError:
            lines.append(f"{module}: not installed")
        except AttributeError:
            lines.append(f"{module}: installed")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        lines.append(f"GPU: {name} (sm{major}{minor})")
    else:
        lines.append("GPU: none (CUDA not available)")
    return lines


def cuda_kernels_report() -> list[str]:
    """What the CUDA C++ kernels (backend="cuda") were built for, and whether this GPU can run them."""
    from fastclip.ops import cuda_common

    reasons = cuda_common.install_reasons()
    if reasons:
        return [f"CUDA kernels (backend='cuda'): {reasons[0]}"]
    lines = [f"CUDA kernels (backend='cuda'): {cuda_common.build_summary()}"]
    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
        why_not = cuda_common.arch_reasons(capability)
        lines.append(f"  this GPU (sm{capability[0]}{capability[1]}): "
                     + ("runs them" if not why_not else "cannot run them: " + "; ".join(why_not)))
    return lines


def backend_report(dtype: torch.dtype = torch.float32) -> list[str]:
    lines = []
    for device in _probe_devices():
        inputs = LossInputs(device, dtype)
        lines.append(f"loss backends on {device} ({str(dtype).replace('torch.', '')}):")
        for name in AUTO_PRIORITY:
            reasons = BACKENDS[name].not_supported_reasons(inputs)
            status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            lines.append(f"  {name:<7} {status}  [{BACKENDS[name].description}]")
        try:
            lines.append(f"  auto -> {select_backend('auto', inputs).name}")
        except ValueError as error:
            lines.append(f"  auto -> none ({error})")
    return lines


def attention_report() -> list[str]:
    try:
        attention = importlib.import_module("fastclip.model.attention")
    except ImportError:
        return ["attention: fastclip.model is not installed"]
    report = getattr(attention, "attention_report", None)
    return list(report()) if callable(report) else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastclip info", description=__doc__)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    for line in _versions() + cuda_kernels_report() + backend_report(getattr(torch, args.dtype)) + attention_report():
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
