"""Linear probe and k-shot logistic regression on frozen features (CLIP paper, section 3.2).

Multinomial logistic regression with L2 regularisation, fitted full-batch with L-BFGS in float64 (the
problem is convex, so the optimum does not depend on the start). Features are standardised with the
training split's statistics. Plain PyTorch of the objective::

    loss = F.cross_entropy(standardised_features @ W.T + b, labels) + weight_decay / 2 * (W ** 2).sum()
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class LogisticRegression:
    """A fitted probe: logits = standardise(features) @ weight.T + bias (float64)."""

    weight: torch.Tensor   # (C, E)
    bias: torch.Tensor     # (C,)
    mean: torch.Tensor     # (E,) training-feature statistics used to standardise
    std: torch.Tensor      # (E,)

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features.double() - self.mean) / self.std

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(M, E) features -> (M, C) logits."""
        return self.standardise(features) @ self.weight.T + self.bias


def probe_objective(x: torch.Tensor, labels: torch.Tensor, weight, bias, weight_decay: float) -> torch.Tensor:
    """Mean cross-entropy + weight_decay / 2 * ||W||^2 on standardised features ``x``."""
    return F.cross_entropy(x @ weight.T + bias, labels) + 0.5 * weight_decay * weight.pow(2).sum()


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                            weight_decay: float = 1e-3, max_iter: int = 200) -> LogisticRegression:
    """Fit on (N, E) features and (N,) int64 labels (classes 0..num_classes-1)."""
    x = features.double()
    probe = LogisticRegression(weight=torch.zeros(num_classes, x.shape[1], dtype=torch.float64),
                               bias=torch.zeros(num_classes, dtype=torch.float64),
                               mean=x.mean(0), std=x.std(0).clamp_min(1e-6))
    x = probe.standardise(x)
    weight, bias = probe.weight.requires_grad_(), probe.bias.requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = probe_objective(x, labels, weight, bias, weight_decay)
        loss.backward()
        return loss

    optimizer.step(closure)
    probe.weight, probe.bias = weight.detach(), bias.detach()
    return probe


def linear_probe(train_features, train_labels, test_features, test_labels, *, shots: int | None = None,
                 weight_decay: float = 1e-3, seed: int = 0) -> dict:
    """Train on (a k-shot subset of) the train features, report test top-1/top-5 accuracy."""
    if shots is not None:
        keep = k_shot_indices(train_labels, shots, seed)
        train_features, train_labels = train_features[keep], train_labels[keep]
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    probe = fit_logistic_regression(train_features, train_labels, num_classes, weight_decay=weight_decay)
    return topk_accuracy(probe.predict(test_features), test_labels, (1, 5))
