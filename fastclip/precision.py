"""Precision modes, named and meant as in open_clip; shared by the model, the trainer and evaluation.

| mode                   | weights                                          | forward compute      | loss scaling |
|------------------------|--------------------------------------------------|----------------------|--------------|
| fp32                   | fp32                                             | fp32                 | no           |
| amp                    | fp32                                             | fp16 autocast        | GradScaler   |
| amp_bf16, amp_bfloat16 | fp32                                             | bf16 autocast        | no           |
| bf16                   | matmul weights bf16, the rest fp32 (see below)   | bf16, no autocast    | no           |
| fp16                   | matmul weights fp16, the rest fp32               | fp16, no autocast    | no           |
| pure_bf16              | every parameter and buffer bf16                  | bf16, no autocast    | no           |
| pure_fp16              | every parameter and buffer fp16                  | fp16, no autocast    | no           |

``bf16`` / ``fp16`` are open_clip's "manual mixed precision that matches original OpenAI behaviour"
(``open_clip.create_model(precision=...)``, ``convert_weights_to_lp``): the weights of Linear and Conv
layers, the attention projections, ``text_projection`` and the image tower's ``proj`` are cast;
LayerNorm, BatchNorm, the embeddings, ``logit_scale`` and ``logit_bias`` stay fp32. LayerNorm then
normalises in fp32 and returns the activations' dtype. Training updates those mixed-dtype parameters
directly, without autocast or a loss scaler, as ``open_clip_train`` does.

``pure_*`` cast every floating tensor of the model (open_clip: ``model.to(dtype)``).

In every mode the images reach the model in its image tower's dtype (``CLIP.encode_image`` casts them,
as open_clip's ``get_input_dtype`` does), and fastclip's loss accumulates in fp32 and returns an fp32
loss (open_clip's computes in the features' dtype), so its value is at least as accurate as open_clip's.

Without ``--precision`` the trainer and ``fastclip eval`` pick :func:`default_precision` for the device:
fp32 on CPU, ``amp_bf16`` on a CUDA GPU with bf16 (sm80+), ``amp`` on older GPUs (V100, T4: sm7x).
Nothing here queries a GPU at import time.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16")

_WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16,
                  "pure_bf16": torch.bfloat16, "pure_fp16": torch.float16}
_AUTOCAST_DTYPES = {"amp": torch.float16, "amp_bf16": torch.bfloat16, "amp_bfloat16": torch.bfloat16}
_NEEDS_BF16 = ("amp_bf16", "amp_bfloat16", "bf16", "pure_bf16")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ValueError listing them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} (open_clip's names)")
    return precision


def low_precision_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype ``precision`` stores weights in (bf16/fp16 and the pure modes), or None (fp32 weights)."""
    return _WEIGHT_DTYPES.get(precision)


def casts_every_tensor(precision: str) -> bool:
    """True for the pure modes, which cast the whole model; bf16/fp16 cast only the matmul weights."""
    return precision.startswith("pure_")


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
    if device.type == "cuda" and precision in _NEEDS_BF16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision {precision} needs a GPU with bf16 (sm80+); use --precision amp")


def default_precision(device: torch.device) -> tuple[str, str]:
    """(precision, why) for a run that names none: fp32 off CUDA; on CUDA, bf16 autocast where the GPU
    has bf16 (sm80+), else fp16 autocast with a GradScaler (sm7x: V100, T4), so the tensor cores work."""
    if device.type != "cuda":
        return "fp32", f"the default on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:  # bf16 tensor cores (is_bf16_supported() is also True where bf16 is only emulated)
        return "amp_bf16", (f"the default on this sm{major}{minor} GPU, which has bf16 tensor cores; "
                            "--precision fp32 for full fp32")
    return "amp", (f"the default on this sm{major}{minor} GPU, which has fp16 but no bf16 tensor cores: fp16 "
                   "autocast with a GradScaler; --precision fp32 for full fp32")
