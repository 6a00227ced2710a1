"""Precision modes, named as in open_clip.

| mode       | parameters | forward compute             | loss scaling |
|------------|------------|-----------------------------|--------------|
| fp32       | fp32       | fp32                        | no           |
| amp        | fp32       | fp16 autocast (V100 path)   | GradScaler   |
| amp_bf16   | fp32       | bf16 autocast               | no           |
| bf16       | bf16       | bf16 (pure, as open_clip)   | no           |
| fp16       | fp16       | fp16 (pure, as open_clip)   | no           |
"""
from __future__ import annotations

import contextlib

import torch


def parameter_dtype(precision: str) -> torch.dtype:
    """dtype the model's parameters are stored in."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` (a null context for fp32 and the pure modes)."""
    if precision == "amp":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "amp_bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_grad_scaler(precision: str, device: torch.device):
    """A GradScaler for ``amp`` (fp16 autocast), else ``None``."""
    if precision != "amp":
        return None
    return torch.amp.GradScaler(device.type)


def check_precision_supported(precision: str, device: torch.device) -> None:
    """Raise ValueError when ``precision`` cannot run on ``device``."""
    if device.type == "cuda" and precision in ("amp_bf16", "bf16") and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision {precision} needs a GPU with bf16 (sm80+); use --precision amp")
