"""Precision modes, named as in open_clip; shared by the trainer and evaluation (both import it from here).

| mode       | parameters | forward compute                   | loss scaling |
|------------|------------|-----------------------------------|--------------|
| fp32       | fp32       | fp32                              | no           |
| amp        | fp32       | fp16 autocast (V100 path)         | GradScaler   |
| amp_bf16   | fp32       | bf16 autocast                     | no           |
| bf16       | bf16       | bf16, no autocast                 | no           |
| fp16       | fp16       | fp16, no autocast                 | no           |
| pure_bf16  | bf16       | bf16, no autocast (open_clip's)   | no           |
| pure_fp16  | fp16       | fp16, no autocast (open_clip's)   | no           |

``pure_bf16`` / ``pure_fp16`` mean what they mean in open_clip: every parameter and buffer of the
model is cast to that dtype (open_clip: ``model.to(dtype)``), the images reach the model in it (open_clip
casts them with ``get_input_dtype``; fastclip's ``CLIP.encode_image`` casts them to its weights' dtype),
and nothing runs under autocast. The loss takes the low-precision features as they come: open_clip's
computes in their dtype and returns a bf16/fp16 loss, fastclip's accumulates in fp32 and returns an fp32
loss (the loss contract, docs/design.md), so the loss value is at least as accurate as open_clip's.

fastclip's ``bf16`` / ``fp16`` cast the whole model too, so today they train as the pure modes do.
open_clip's own ``bf16`` / ``fp16`` cast only the matmul weights and keep LayerNorm in fp32; that
variant is not implemented.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "amp", "amp_bf16", "bf16", "fp16", "pure_bf16", "pure_fp16")

_PARAMETER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16,
                     "pure_bf16": torch.bfloat16, "pure_fp16": torch.float16}
_AUTOCAST_DTYPES = {"amp": torch.float16, "amp_bf16": torch.bfloat16}


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
    bf16 = precision in ("amp_bf16", "bf16", "pure_bf16")
    if device.type == "cuda" and bf16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision {precision} needs a GPU with bf16 (sm80+); use --precision amp")
