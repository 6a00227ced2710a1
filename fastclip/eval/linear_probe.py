"""Linear probe and k-shot logistic regression on frozen features (CLIP paper, section 3.2).

Multinomial logistic regression with L2 regularisation, fitted full-batch with L-BFGS in float64 (the
problem is convex, so the optimum does not depend on the start). Features are standardised with the
training split's statistics. Plain PyTorch of the objective::

    loss = F.cross_entropy(features @ W.T + b, labels) + weight_decay / 2 * (W ** 2).sum()
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastclip.eval.zeroshot import topk_accuracy


def k_shot_indices(labels: torch.Tensor, shots: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``shots`` random examples per class (all of a class when it has fewer)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:shots]])
    return torch.cat(chosen).sort().values


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                            weight_decay: float = 1e-3, max_iter: int = 200):
    """Fit on (N, E) features and (N,) labels. Returns a predict function: (M, E) -> (M, C) logits."""
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda new: ((new.double() - mean) / std) @ weight.T + bias


def linear_probe(train_features, train_labels, test_features, test_labels, *, shots: int | None = None,
                 weight_decay: float = 1e-3, seed: int = 0) -> dict:
    """Train on (a k-shot subset of) the train features, report test top-1/top-5 accuracy."""
    if shots is not None:
        keep = k_shot_indices(train_labels, shots, seed)
        train_features, train_labels = train_features[keep], train_labels[keep]
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predict = fit_logistic_regression(train_features, train_labels, num_classes, weight_decay=weight_decay)
    return topk_accuracy(predict(test_features), test_labels, (1, 5))
