"""Classification metrics on predicted probabilities: accuracy, NLL, expected calibration error."""

from __future__ import annotations

import torch


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose most probable class is the label."""
    return (probs.argmax(dim=1) == labels).double().mean().item()


def nll(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the labels (probabilities clamped at ``eps``)."""
    picked = probs.double().gather(1, labels.view(-1, 1)).squeeze(1)
    return (-picked.clamp_min(eps).log()).mean().item()


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: sum_b (n_b / N) |acc(b) - conf(b)| over equal-width confidence bins.

    Bins are (lo, hi]; a confidence of exactly 0 falls in the first bin.
    """
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels).double()
    bins = torch.clamp(torch.ceil(confidence * n_bins).long() - 1, 0, n_bins - 1)
    total = torch.zeros(n_bins, dtype=torch.float64)
    hits = torch.zeros(n_bins, dtype=torch.float64)
    total.index_add_(0, bins, confidence)
    hits.index_add_(0, bins, correct)
    return ((hits - total).abs().sum() / len(labels)).item()


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL and 15-bin ECE of one model's (or an ensemble's) probabilities."""
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels)}
