"""Metrics on predicted probabilities: accuracy, NLL, ECE, Brier score; ensemble growth curves; output
diversity between members (disagreement, KL divergence, output correlation) and linear CKA between
their penultimate-layer features.

Diversity follows the definitions of the Low-Cost Ensemble Learning survey: for members f1, f2 over N
samples, d_PDR = (1/N) sum_i 1[argmax f1(x_i) != argmax f2(x_i)], d_KL = (1/N) sum_i sum_k
f1(x_i)_k log(f1(x_i)_k / f2(x_i)_k), d_corr = (1/N) sum_i corr(f1(x_i), f2(x_i)).
"""

from __future__ import annotations

import torch

from ..base import Metric

# What a classification worker scores a candidate on (the population log's val_accuracy and val_nll).
VALIDATION_METRICS = (Metric("accuracy", higher_is_better=True, label="acc"), Metric("nll", higher_is_better=False))


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
    bins = reliability(probs, labels, n_bins)
    return sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / len(labels)


def reliability(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> list[dict[str, float]]:
    """Per confidence bin (the bins of :func:`ece`): its range, sample count, mean confidence and accuracy
    (0 for an empty bin), the data of a reliability diagram."""
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels).double()
    bins = torch.clamp(torch.ceil(confidence * n_bins).long() - 1, 0, n_bins - 1)
    count = torch.bincount(bins, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    hit_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    safe = count.clamp_min(1)
    return [{"low": b / n_bins, "high": (b + 1) / n_bins, "count": int(count[b]),
             "confidence": (conf_sum[b] / safe[b]).item(), "accuracy": (hit_sum[b] / safe[b]).item()}
            for b in range(n_bins)]


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over samples of sum_k (p_k - 1[k = label])^2."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return ((probs.double() - onehot) ** 2).sum(dim=1).mean().item()


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL, 15-bin ECE and Brier score of one model's (or an ensemble's) probabilities."""
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels),
            "brier": brier(probs, labels)}


def growth_curve(member_probs: list[torch.Tensor], labels: torch.Tensor) -> list[dict[str, float]]:
    """Metrics of the ensemble of the first k members, k = 1..M (members in selection order)."""
    running = torch.zeros_like(member_probs[0], dtype=torch.float64)
    curve = []
    for k, probs in enumerate(member_probs, start=1):
        running += probs.double()
        curve.append(dict(classification_metrics(running / k, labels), members=k))
    return curve


def disagreement(p1: torch.Tensor, p2: torch.Tensor) -> float:
    """d_PDR: the share of samples on which the two members' top classes differ."""
    return (p1.argmax(dim=1) != p2.argmax(dim=1)).double().mean().item()


def kl_divergence(p1: torch.Tensor, p2: torch.Tensor, eps: float = 1e-12) -> float:
    """d_KL = mean over samples of KL(p1 || p2) (probabilities clamped at ``eps``)."""
    a, b = p1.double().clamp_min(eps), p2.double().clamp_min(eps)
    return (a * (a.log() - b.log())).sum(dim=1).mean().item()


def output_correlation(p1: torch.Tensor, p2: torch.Tensor) -> float:
    """d_corr = mean over samples of the Pearson correlation of the two output vectors."""
    a = p1.double() - p1.double().mean(dim=1, keepdim=True)
    b = p2.double() - p2.double().mean(dim=1, keepdim=True)
    return ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).mean().item()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same samples (rows): 1 for identical ones, invariant
    to orthogonal transforms and isotropic scaling (Kornblith et al., 2019)."""
    x = x.double().flatten(1)
    y = y.double().flatten(1)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    cross = (y.T @ x).norm() ** 2
    return (cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-300)).item()


def pairwise(items: list[torch.Tensor], measure) -> dict:
    """``measure`` between every ordered pair of members: the matrix and the mean over pairs i != j."""
    count = len(items)
    matrix = [[measure(items[i], items[j]) for j in range(count)] for i in range(count)]
    off = [matrix[i][j] for i in range(count) for j in range(count) if i != j]
    return {"matrix": matrix, "mean": sum(off) / len(off) if off else 0.0}


def diversity(member_probs: list[torch.Tensor], member_features: list[torch.Tensor]) -> dict[str, dict]:
    """Pairwise disagreement, KL divergence, output correlation and penultimate-feature linear CKA."""
    return {"disagreement": pairwise(member_probs, disagreement), "kl": pairwise(member_probs, kl_divergence),
            "correlation": pairwise(member_probs, output_correlation),
            "cka": pairwise(member_features, linear_cka)}


def ensemble_gain(parent: dict[str, float], members: list[dict[str, float]], ensemble: dict[str, float]) -> dict:
    """The ensemble's gain over the parent, split into member quality and diversity.

    With NLL: ``gain = parent - ensemble = diversity - member_cost``, where ``member_cost = mean member -
    parent`` (what perturbing and tuning cost each member; negative when members beat the parent) and
    ``diversity = mean member - ensemble`` (what averaging members that disagree wins back; >= 0 for
    NLL by Jensen's inequality). Accuracy is split the same way, with signs turned so that a positive
    ``gain`` is better for both metrics.
    """
    out = {}
    for metric, sign in (("nll", 1.0), ("accuracy", -1.0)):
        mean_member = sum(m[metric] for m in members) / len(members)
        out[metric] = {"parent": parent[metric], "mean_member": mean_member, "ensemble": ensemble[metric],
                       "member_cost": sign * (mean_member - parent[metric]),
                       "diversity": sign * (mean_member - ensemble[metric]),
                       "gain": sign * (parent[metric] - ensemble[metric])}
    return out
