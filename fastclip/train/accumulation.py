"""Forward + backward of one training step, whole-batch or with GradCache-style accumulation.

With ``accum_freq = k`` the batch (B) is split into k micro-batches of b = B/k and:

1. each micro-batch runs forward **without grad** (activations freed at once); the RNG state before
   each one is recorded; the features are cached: (B, E) image and text features in all;
2. the contrastive loss runs on **all** cached features (the full-batch negatives, and under DDP the
   global batch), with the features, ``logit_scale`` and ``logit_bias`` as leaves; its backward gives
   dL/d(features) and dL/d(logit_scale);
3. each micro-batch runs forward again **with grad**, from its recorded RNG state, so dropout and
   patch-dropout masks are the ones of step 1, and back-propagates its slice of dL/d(features). The
   temperature (and bias) gradient is fed once, with the last micro-batch, which is also the only one
   whose backward synchronises gradients (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``).

The parameter gradient equals the one of the full-batch loss with the same masks, while peak
activation memory is that of one micro-batch (plus the (B, E) feature cache). Plain PyTorch equivalent::

    out = model(images, tokens); loss_fn(**out).backward()        # what accum_freq=k reproduces
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fastclip.precision import autocast


@dataclass
class RngSnapshot:
    """CPU and (when used) CUDA generator states: replayed to redraw the same dropout masks."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @classmethod
    def take(cls, device: torch.device) -> "RngSnapshot":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, device)


def _loss_inputs(output: dict) -> dict:
    inputs = {"image_features": output["image_features"], "text_features": output["text_features"],
              "logit_scale": output["logit_scale"]}
    if output.get("logit_bias") is not None:
        inputs["logit_bias"] = output["logit_bias"]
    return inputs


def _no_sync(model: torch.nn.Module, skip_sync: bool):
    if skip_sync and hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if skip_sync and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        from fastclip.train.fsdp import gradient_sync

        return gradient_sync(model, enabled=False)
    return contextlib.nullcontext()


def forward_backward(model: torch.nn.Module, loss_fn, images: torch.Tensor, tokens: torch.Tensor, *,
                     precision: str, device: torch.device, accum_freq: int = 1, scaler=None,
                     ranges=None) -> torch.Tensor:
    """Run forward and backward of one batch; gradients are left in ``.grad``. Returns the detached loss.

    images: (B, 3, H, W); tokens: (B, L) int64; B divisible by ``accum_freq``. ``model`` may be wrapped in
    DistributedDataParallel or sharded with FSDP2. ``scaler``: a GradScaler (``amp``) that scales the loss before
    backward.
    ``ranges``: a :class:`~fastclip.train.profiling.NvtxRanges` (or None).
    """
    ranges = ranges or (lambda name: contextlib.nullcontext())
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    if accum_freq == 1:
        with ranges("forward"), autocast(precision, device):
            output = model(images, tokens)
        with ranges("loss"), autocast(precision, device):
            loss = loss_fn(**_loss_inputs(output))
        with ranges("backward"):
            scale(loss).backward()
        return loss.detach()

    image_chunks, token_chunks = images.chunk(accum_freq), tokens.chunk(accum_freq)
    if len(image_chunks) != accum_freq or images.shape[0] % accum_freq:
        raise ValueError(f"a batch of {images.shape[0]} does not split into {accum_freq} equal micro-batches")
    snapshots, cached = [], []
    with ranges("forward"), torch.no_grad():
        for image_chunk, token_chunk in zip(image_chunks, token_chunks):
            snapshots.append(RngSnapshot.take(device))
            with autocast(precision, device):
                cached.append(_loss_inputs(model(image_chunk, token_chunk)))
    after_forward = RngSnapshot.take(device)

    leaves = {"image_features": torch.cat([c["image_features"] for c in cached]).requires_grad_(),
              "text_features": torch.cat([c["text_features"] for c in cached]).requires_grad_()}
    for key in ("logit_scale", "logit_bias"):
        if key in cached[0]:
            leaves[key] = cached[0][key].detach().clone().requires_grad_()
    with ranges("loss"), autocast(precision, device):
        loss = loss_fn(**leaves)
    with ranges("backward"):
        scale(loss).backward()

    micro = image_chunks[0].shape[0]
    for index, (image_chunk, token_chunk) in enumerate(zip(image_chunks, token_chunks)):
        last = index == accum_freq - 1
        snapshots[index].restore(device)
        rows = slice(index * micro, (index + 1) * micro)
        with _no_sync(model, skip_sync=not last):
            with ranges("forward"), autocast(precision, device):
                output = _loss_inputs(model(image_chunk, token_chunk))
            outputs = [output["image_features"], output["text_features"]]
            grads = [leaves["image_features"].grad[rows], leaves["text_features"].grad[rows]]
            if last:  # the temperature/bias gradient, counted once
                for key in ("logit_scale", "logit_bias"):
                    if key in leaves:
                        outputs.append(output[key])
                        grads.append(leaves[key].grad)
            with ranges("backward"):
                torch.autograd.backward(outputs, grads)
    after_forward.restore(device)
    return loss.detach()
