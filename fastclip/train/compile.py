"""``--torchcompile``: ``torch.compile`` the model and the contrastive loss of a training step.

The model is compiled as open_clip's ``--torchcompile`` does (graph breaks allowed: activation
checkpointing and the attention backends stay as they are). The loss is compiled with
``fullgraph=True`` in a single process, so a graph break in it is an error rather than a silent slow
path; under torch.distributed its collectives are left to run eagerly (``fullgraph=False``).
The uncompiled modules share the parameters: save and evaluate those (no ``_orig_mod.`` prefix).
"""
from __future__ import annotations

import torch


def compile_model_and_loss(model: torch.nn.Module, loss_fn: torch.nn.Module, *, distributed: bool = False):
    """-> (compiled model, compiled loss); compilation itself happens at the first call."""
    return torch.compile(model), torch.compile(loss_fn, fullgraph=not distributed)
