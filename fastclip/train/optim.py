"""AdamW with open_clip's parameter groups, open_clip's learning-rate schedules, the logit-scale clamp."""
from __future__ import annotations

import math

import torch

MAX_LOGIT_SCALE_LOG = math.log(100.0)  # CLIP clamps the learned temperature at 100


def _no_weight_decay(name: str, parameter: torch.nn.Parameter) -> bool:
    """open_clip's rule: gains, biases, norms and the temperature are not decayed."""
    return parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
        or "logit_bias" in name


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if _no_weight_decay(name, parameter) else decay).append(parameter)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.98),
                    eps: float = 1e-6) -> tuple[torch.optim.Optimizer, str]:
    """AdamW: apex FusedAdam when apex is installed and the model is on CUDA, else torch's fused
    implementation when it supports the device, else the foreach one. Returns (optimizer, name)."""
    groups = parameter_groups(model, weight_decay)
    device_type = next(model.parameters()).device.type
    if device_type == "cuda":
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True), "apex.FusedAdam"
        except ImportError:
            pass
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True), "torch.AdamW(fused)"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True), "torch.AdamW(foreach)"


class LearningRateSchedule:
    """open_clip's schedules, a pure function of the step (resuming needs only the step):

    linear warm-up to ``base_lr`` over ``warmup_steps``, then
    - ``cosine``: cosine decay to 0 at ``total_steps``;
    - ``const``: ``base_lr``;
    - ``const-cooldown``: ``base_lr`` until ``total_steps - cooldown_steps``, then
      ``end_lr + (base_lr - end_lr) * (1 - t)^power`` with t going from 0 to 1 over the cooldown.
    """

    KINDS = ("cosine", "const", "const-cooldown")

    def __init__(self, base_lr: float, warmup_steps: int, total_steps: int, kind: str = "cosine", *,
                 cooldown_steps: int = 0, cooldown_power: float = 1.0, cooldown_end_lr: float = 0.0):
        if kind not in self.KINDS:
            raise ValueError(f"unknown --lr-scheduler {kind!r}; use one of {', '.join(self.KINDS)}")
        self.base_lr, self.warmup_steps, self.total_steps, self.kind = base_lr, warmup_steps, total_steps, kind
        self.cooldown_steps, self.cooldown_power, self.cooldown_end_lr = cooldown_steps, cooldown_power, cooldown_end_lr

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "const":
            return self.base_lr
        if self.kind == "const-cooldown":
            start = self.total_steps - self.cooldown_steps
            if step < start:
                return self.base_lr
            progress = min(1.0, (step - start) / max(1, self.cooldown_steps))
            decay = (1 - progress) ** self.cooldown_power
            return decay * (self.base_lr - self.cooldown_end_lr) + self.cooldown_end_lr
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return 0.5 * (1 + math.cos(math.pi * progress)) * self.base_lr

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "kind": self.kind, "cooldown_steps": self.cooldown_steps, "cooldown_power": self.cooldown_power,
                "cooldown_end_lr": self.cooldown_end_lr}


def find_parameter(model: torch.nn.Module, name: str):
    """The parameter called ``name`` (e.g. ``logit_scale``) at the top of ``model``, or None."""
    return dict(model.named_parameters()).get(name)


@torch.no_grad()
def clamp_logit_scale(logit_scale: torch.nn.Parameter | None) -> None:
    """Keep log(temperature) in [0, ln 100], as CLIP does after every optimiser step."""
    if logit_scale is not None:
        logit_scale.clamp_(0, MAX_LOGIT_SCALE_LOG)
