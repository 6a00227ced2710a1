"""Inputs and reference runners shared by the loss tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_like_features(batch: int, dim: int, dtype=torch.float32, *, seed: int, correlated: float = 0.5):
    """Unit-norm image/text features whose pairs are somewhat aligned, as in a CLIP model mid-training."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    text = correlated * image + torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    return F.normalize(image, dim=-1).to(dtype), F.normalize(text, dim=-1).to(dtype)


def loss_and_grads(loss_module, image, text, logit_scale, logit_bias=None, **forward_kwargs):
    """Run forward + backward on fresh leaves; returns {"loss", "image", "text", "logit_scale", "logit_bias"}."""
    leaves = {"image": image.detach().clone().requires_grad_(), "text": text.detach().clone().requires_grad_(),
              "logit_scale": torch.as_tensor(logit_scale, dtype=image.dtype).detach().clone().requires_grad_()}
    args = [leaves["image"], leaves["text"], leaves["logit_scale"]]
    if logit_bias is not None:
        leaves["logit_bias"] = torch.as_tensor(logit_bias, dtype=image.dtype).detach().clone().requires_grad_()
        args.append(leaves["logit_bias"])
    output = loss_module(*args, **forward_kwargs)
    loss = output["contrastive_loss"] if isinstance(output, dict) else output
    loss.backward()
    result = {"loss": loss.detach()}
    for name, leaf in leaves.items():
        result[name] = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    return result


def grads_against_open_clip(ours_loss, reference_loss, image, text, logit_scale, logit_bias, normalize=False):
    """(ours, open_clip's) loss_and_grads for a CLIP-style loss; the reference sees normalised features
    when ``normalize`` asks the loss under test to normalise them itself."""
    prepare = (lambda f: F.normalize(f, dim=-1)) if normalize else (lambda f: f)
    ours = loss_and_grads(ours_loss, image, text, logit_scale, logit_bias)
    reference = loss_and_grads(lambda i, t, *rest: reference_loss(prepare(i), prepare(t), *rest),
                               image, text, logit_scale, logit_bias)
    return ours, reference


def siglip_grads_against_open_clip(ours_loss, reference_loss, image, text, logit_scale, logit_bias):
    """(ours, open_clip's) loss_and_grads for SigLIP modules taking (image, text, scale, bias or None)."""
    def bias_or_none(loss):
        return lambda i, t, s, *b: loss(i, t, s, b[0] if b else None)

    return (loss_and_grads(bias_or_none(ours_loss), image, text, logit_scale, logit_bias),
            loss_and_grads(bias_or_none(reference_loss), image, text, logit_scale, logit_bias))
