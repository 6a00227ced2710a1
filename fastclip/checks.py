"""Input checks shared by the loss API: every bad input gets a ValueError/TypeError that names the fix."""
from __future__ import annotations

import math
import os

import torch

from fastclip.devices import FLOAT_DTYPES, KERNEL_DTYPES


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def check_features(image_features, text_features) -> None:
    """Both (B, D) floating tensors of one dtype on one device, B >= 1, D >= 1, same shape."""
    for name, value in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, D), got {type(value).__name__}")
        if value.dim() != 2:
            raise ValueError(f"{name} must be 2-D (B, D), got shape {tuple(value.shape)}: "
                             "flatten extra dimensions, e.g. features.reshape(-1, features.shape[-1])")
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {value.dtype}: pass float32, float16 or bfloat16 features "
                            "(e.g. features.float())")
        if value.shape[0] == 0 or value.shape[1] == 0:
            raise ValueError(f"{name} has shape {tuple(value.shape)}: the batch and the feature "
                             "dimension must be at least 1 (empty batch?)")
    if image_features.shape != text_features.shape:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must have the same shape (B, D): one caption per "
                         "image, both projected to the same embedding dimension")
    if image_features.dtype != text_features.dtype:
        raise TypeError(f"image_features is {image_features.dtype} but text_features is {text_features.dtype}: "
                        "cast both to one dtype (e.g. .to(torch.bfloat16))")
    if image_features.device != text_features.device:
        raise ValueError(f"image_features is on {image_features.device} but text_features is on "
                         f"{text_features.device}: move both to one device")


HOST_CHECK_ENV = "FASTCLIP_HOST_CHECKS"


def host_checks_enabled() -> bool:
    """FASTCLIP_HOST_CHECKS=1 (read at call time): also read logit_scale/logit_bias tensors on the host."""
    return os.environ.get(HOST_CHECK_ENV, "0").strip() not in ("", "0")


def _check_value(number: float, name: str, positive: bool) -> None:
    if not math.isfinite(number):
        raise ValueError(f"{name} is {number}: it must be finite. A diverged temperature usually means "
                         "the learning rate is too high, or clamp it (open_clip clamps ln(scale) at ln 100)")
    if positive and number <= 0:
        raise ValueError(f"{name} is {number} but must be > 0. It is the already-exponentiated "
                         "temperature: pass model.logit_scale.exp(), not the log")


def as_scalar_tensor(value, name: str, reference: torch.Tensor, *, positive: bool) -> torch.Tensor:
    """A float or one-element tensor -> a one-element tensor on reference's device (grad kept).

    A Python float, or a CPU tensor (reading it syncs nothing), is checked here, on the host: a
    non-finite value (or a non-positive one when ``positive``) raises ValueError. A device tensor's
    value is never read on the host (no ``float()``, no device sync, CUDA-graph and torch.compile
    safe): ``guard_scalars`` checks it on the device instead, so a bad one gives a NaN loss.
    FASTCLIP_HOST_CHECKS=1 reads it here too and raises the same ValueError, at the price of one
    device-to-host sync per call (a debugging setting).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a one-element tensor, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        _check_value(float(value), name, positive)
        return torch.tensor(float(value), device=reference.device)
    if value.numel() != 1:
        raise ValueError(f"{name} must hold one value, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {value.dtype}: use .float()")
    if value.device != reference.device and value.device.type != "cpu":
        raise ValueError(f"{name} is on {value.device} but the features are on {reference.device}: "
                         "move it to the features' device")
    tensor = value if value.device == reference.device else value.to(reference.device)
    if (host_checks_enabled() or reads_without_sync(value.device)) and not _is_compiling() \
            and tensor.device.type != "meta":
        _check_value(float(value.detach().reshape(())), name, positive)  # free on CPU; opted-in elsewhere
    return tensor


def reads_without_sync(device: torch.device) -> bool:
    """True where reading a value on the host waits for nothing: a CPU tensor (no stream to sync)."""
    return device.type == "cpu"


def guard_scalars(scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``scale``, or NaN where scale is not finite and > 0 or bias is not finite: checked on the device.

    No host sync: one elementwise ``where`` on 0-dim tensors. A bad logit_scale or logit_bias tensor
    thus makes the loss and every gradient NaN (never a wrong finite number), which the trainer's
    non-finite-loss check reports; FASTCLIP_HOST_CHECKS=1 turns it into the ValueError of
    ``as_scalar_tensor``. A valid scale passes unchanged (times 1), and so does its gradient.
    """
    valid = torch.isfinite(scale) & (scale > 0) & torch.isfinite(bias)
    return scale * torch.where(valid, 1.0, float("nan")).to(scale.dtype)  # a product: d/d scale is NaN too


def check_kernel_inputs(backend: str, devices: tuple[str, ...], image: torch.Tensor, text: torch.Tensor,
                        *others: torch.Tensor) -> None:
    """A fused backend's own checks on its primitives' tensors (the loss API checks more, earlier).

    image (b, D) and text (n, D) of one KERNEL_DTYPES dtype, b, n, D >= 1; every tensor on image's
    device, whose kind is one of ``devices``.
    """
    if image.dtype not in KERNEL_DTYPES or text.dtype != image.dtype:
        raise TypeError(f"the {backend} backend takes float32/float16/bfloat16 features of one dtype, got "
                        f"{image.dtype} and {text.dtype}: cast them, or use backend='torch'")
    if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1] or image.shape[1] == 0:
        raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must be (b, D) and (n, D), D >= 1")
    if image.shape[0] == 0 or text.shape[0] == 0:
        raise ValueError(f"the {backend} backend needs at least one image row and one text row")
    kinds = "/".join(kind.upper() for kind in devices)
    for tensor in (image, text, *others):
        if tensor.device.type not in devices or tensor.device != image.device:
            raise ValueError(f"the {backend} backend runs on one {kinds} device; got tensors on {image.device} and "
                             f"{tensor.device}: move them to the same device")
