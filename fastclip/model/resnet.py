"""OpenAI's ModifiedResNet image tower.

Differences from torchvision's ResNet (all OpenAI's): a 3-conv stem with an average pool instead
of a max pool; anti-aliased strided convolutions (an ``AvgPool2d`` before a stride-1 conv); and an
attention pool (one query: the mean of the final feature map) instead of global average pooling.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .attention import attention, check_attn_impl
from .config import VisionConfig
from .transformer import checkpoint_call

__all__ = ["Bottleneck", "AttentionPool2d", "ModifiedResNet"]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # all convs have stride 1; an avgpool follows conv2 when stride > 1
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.act3(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling of a (B, C, H, W) map with the spatial mean as the only query.

    Keys ``positional_embedding, q_proj, k_proj, v_proj, c_proj`` (OpenAI's). OpenAI runs
    attention for all HW + 1 queries and keeps row 0; this computes row 0 only (same result).
    """

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads: int, output_dim: int, attn_impl: str = "auto"):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads
        self.attn_impl = check_attn_impl(attn_impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, output_dim)."""
        batch, channels = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        heads = self.num_heads
        query = self.q_proj(x[:, :1]).view(batch, 1, heads, -1)
        key = self.k_proj(x).view(batch, x.shape[1], heads, -1)
        value = self.v_proj(x).view(batch, x.shape[1], heads, -1)
        out = attention(query, key, value, impl=self.attn_impl)
        return self.c_proj(out.reshape(batch, channels))


class _KeepBatchNormStats:
    """Recompute context for checkpointed ResNet blocks: BatchNorm running stats update once.

    A checkpointed block runs its forward twice in training (once more in backward), and
    BatchNorm would update ``running_mean/var`` and ``num_batches_tracked`` both times. This
    snapshots them when the recompute starts and restores them when it ends.
    """

    def __init__(self, *modules: nn.Module):
        self.norms = [m for module in modules for m in module.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @contextmanager
    def __call__(self):
        saved = [(m, [b.clone() if b is not None else None for b in
                      (m.running_mean, m.running_var, m.num_batches_tracked)]) for m in self.norms]
        try:
            yield
        finally:
            with torch.no_grad():
                for module, (mean, var, count) in saved:
                    for buffer, value in ((module.running_mean, mean), (module.running_var, var),
                                          (module.num_batches_tracked, count)):
                        if buffer is not None:
                            buffer.copy_(value)


class ModifiedResNet(nn.Module):
    """stem -> layer1..layer4 (Bottlenecks) -> attnpool; keys equal OpenAI's."""

    def __init__(self, config: VisionConfig, output_dim: int, attn_impl: str = "auto"):
        super().__init__()
        width = config.width
        self.image_size = config.image_size
        self.output_dim = output_dim
        self.grad_checkpointing = False
        # the 3-layer stem
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        # residual stages
        self._inplanes = width
        self.layer1 = self._make_layer(width, config.layers[0])
        self.layer2 = self._make_layer(width * 2, config.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, config.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, config.layers[3], stride=2)
        self.attnpool = AttentionPool2d(config.grid_size, width * 32, config.heads, output_dim, attn_impl)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def _call(self, function, x, *modules: nn.Module):
        """function(x), checkpointed per call when enabled (BatchNorm stats of ``modules`` kept)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            keep_stats = _KeepBatchNormStats(*modules)
            return checkpoint_call(function, x, context_fn=lambda: (nullcontext(), keep_stats()))
        return function(x)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, 3, S, S) with S = image_size -> (B, output_dim), not normalised."""
        if image.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images of {self.image_size}x{self.image_size}, got "
                             f"{tuple(image.shape[-2:])}; create the model with image_size=... to change it")
        x = self._call(self.stem, image, self.bn1, self.bn2, self.bn3)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = self._call(block, x, block)
        return self.attnpool(x)
