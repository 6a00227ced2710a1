"""Helpers shared by the model tests."""
import torch


def perturb(model, seed):
    """Make every 1-D parameter and BatchNorm statistic non-trivial (open_clip inits many to 0 or 1)."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_((0.1 * torch.randn(parameter.shape, generator=generator)).to(parameter.dtype))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
