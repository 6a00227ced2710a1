"""CLIP image preprocessing (torchvision), equal to open_clip's ``image_transform``.

eval:  Resize(shortest side -> S, bicubic) -> CenterCrop(S) -> RGB -> [0, 1] tensor -> Normalize
train: RandomResizedCrop(S, scale=(0.9, 1.0), bicubic) -> RGB [-> ColorJitter] [-> RandomGrayscale]
       -> [0, 1] tensor -> Normalize

(open_clip's options: eval ``resize_mode`` "longest" resizes the longest side to S and pads to S x S,
"squash" resizes to S x S; ``interpolation`` "bilinear" applies to the eval resize, "random" means
bicubic there, and training always crops bicubic, as in open_clip's non-timm path.)

with OpenAI's CLIP mean and std. Inputs are PIL images (or tensors, which skip the RGB and
to-tensor steps as in open_clip). Every step is a module-level class, so the transform pickles into
DataLoader workers.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["image_transform", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ConvertRGB", "ToTensorIfNeeded"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConvertRGB:
    """PIL ``convert("RGB")``; tensors and arrays pass through (open_clip's MaybeConvertMode)."""

    def __call__(self, image):
        return image if not hasattr(image, "convert") else image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ToTensorIfNeeded:
    """PIL/ndarray -> float tensor in [0, 1] (``to_tensor``); tensors pass through (MaybeToTensor)."""

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image
        from torchvision.transforms import functional  # noqa: PLC0415

        return functional.to_tensor(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _square_size(image_size: Union[int, Sequence[int]]) -> int:
    if isinstance(image_size, int):
        return image_size
    size = tuple(image_size)
    if len(size) == 1 or (len(size) == 2 and size[0] == size[1]):
        return int(size[0])
    raise ValueError(f"image_transform supports square sizes only, got {size}")


class ResizeLongest:
    """Resize so that the longest side is ``size``, keeping the aspect ratio (open_clip's ResizeKeepRatio(longest=1))."""

    def __init__(self, size: int, interpolation):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image):
        from torchvision.transforms import functional  # noqa: PLC0415

        height, width = functional.get_image_size(image)[::-1]
        ratio = max(height, width) / self.size
        target = [max(1, round(height / ratio)), max(1, round(width / ratio))]
        return functional.resize(image, target, interpolation=self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "random")


def image_transform(image_size: Union[int, Tuple[int, int]], train: bool = False, *,
                    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                    scale: Tuple[float, float] = (0.9, 1.0), interpolation: Optional[str] = None,
                    resize_mode: Optional[str] = None, color_jitter: Optional[Sequence[float]] = None,
                    color_jitter_prob: float = 0.0, gray_scale_prob: float = 0.0):
    """The CLIP preprocessing pipeline for ``image_size`` (see module docstring).

    train: random resized crop with ``scale`` (open_clip's default (0.9, 1.0)) instead of
        resize + center crop; with ``color_jitter`` = (brightness, contrast, saturation, hue) applied
        with probability ``color_jitter_prob``, and grayscale with probability ``gray_scale_prob``.
    mean, std: per-channel normalisation; OpenAI's CLIP statistics by default.
    interpolation: "bicubic" (default), "bilinear" or "random" (bicubic), for the eval resize.
    resize_mode: "shortest" (default: shortest side + center crop), "longest" (+ pad) or "squash" (eval).
    Returns a ``torchvision.transforms.Compose`` mapping a PIL image to a (3, S, S) float tensor.
    """
    from torchvision import transforms  # noqa: PLC0415 (torchvision is slow to import)
    from torchvision.transforms import InterpolationMode  # noqa: PLC0415

    if (interpolation or "bicubic") not in INTERPOLATIONS or (resize_mode or "shortest") not in RESIZE_MODES:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS} and resize_mode one of {RESIZE_MODES}; "
                         f"got {interpolation!r}, {resize_mode!r}")
    size = _square_size(image_size)
    normalize = transforms.Normalize(mean=tuple(mean or OPENAI_CLIP_MEAN), std=tuple(std or OPENAI_CLIP_STD))
    if train:
        steps = [transforms.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC),
                 ConvertRGB()]
        if color_jitter_prob:
            steps.append(transforms.RandomApply([transforms.ColorJitter(*color_jitter)], p=color_jitter_prob))
        if gray_scale_prob:
            steps.append(transforms.RandomGrayscale(p=gray_scale_prob))
        return transforms.Compose(steps + [ToTensorIfNeeded(), normalize])
    mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
    if resize_mode == "longest":
        steps = [ResizeLongest(size, mode), transforms.CenterCrop(size)]  # CenterCrop pads with 0 when smaller
    elif resize_mode == "squash":
        steps = [transforms.Resize((size, size), interpolation=mode)]
    else:
        steps = [transforms.Resize(size, interpolation=mode), transforms.CenterCrop(size)]
    return transforms.Compose(steps + [ConvertRGB(), ToTensorIfNeeded(), normalize])
