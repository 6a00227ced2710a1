"""Precision modes, named as in open_clip; shared by the trainer and evaluation (both import it from here).

| mode       | parameters | forward compute                   | loss scaling |
|------------|------------|-----------------------------------|--------------|
| fp32       | fp32       | fp32                              | no           |
| amp        | fp32       | fp16 autocast (V100 path)         | GradScaler   |
| amp_bf16   | fp32       | bf16 autocast                     | no           |
| bf16       | bf16       | bf16 (pure, as open_clip)         | no           |
| fp16       | fp16       | fp16 (pure, as open_clip)         | no           |
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "amp", "amp_bf16", "bf16", "fp16")

_PARAMETER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_AUTOCAST_DTYPES = {"amp": torch.float16, "amp_bf16": torch.bfloat16}


def check_precision(precision: str) -> None:
    """ValueError naming the modes when ``precision`` is not one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def parameter_dtype(precision: str) -> torch.dtype:
    """dtype the model's parameters are stored in."""
    return _PARAMETER_DTYPES.get(precision, torch.float32)


def autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` (a null context for fp32 and the low-precision-weight modes)."""
    if precision in _AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def make_grad_scaler(precision: str, device: torch.device):
    """A GradScaler for ``amp`` (fp16 autocast), else ``None``."""
    if precision != "amp":
        return None
    return torch.amp.GradScaler(device.type)


def check_precision_supported(precision: str, device: torch.device) -> None:
    """Raise ValueError when ``precision`` cannot run on ``device``."""
    check_precision(precision)
    bf16 = precision in ("amp_bf16", "bf16")
    if device.type == "cuda" and bf16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision {precision} needs a GPU with bf16 (sm80+); use --precision amp")
