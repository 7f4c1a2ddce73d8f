"""Test-split metrics against hand-computed values, and the learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from evo_subens.tasks.classification.metrics import (accuracy, brier, classification_metrics, disagreement, diversity, ece, reliability,
                                growth_curve, kl_divergence, linear_cka, nll, output_correlation)
from evo_subens.tasks.classification.training import lr_factor

# 4 samples, 3 classes. Confidence / prediction / correct:
#   0.9 -> 0 (label 0, right)   bin 13 = (13/15, 14/15]
#   0.7 -> 1 (label 0, wrong)   bin 10 = (10/15, 11/15]
#   0.7 -> 2 (label 2, right)   bin 10
#   0.5 -> 0 (label 1, wrong)   bin 7  = (7/15, 8/15]
PROBS = torch.tensor([[0.9, 0.05, 0.05],
                      [0.2, 0.7, 0.1],
                      [0.1, 0.2, 0.7],
                      [0.5, 0.3, 0.2]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 2, 1])


def test_accuracy_by_hand() -> None:
    """Two of four argmax predictions are right."""
    assert accuracy(PROBS, LABELS) == 0.5


def test_nll_by_hand() -> None:
    """Mean of -log p(label): p = 0.9, 0.2, 0.7, 0.3."""
    expected = -(math.log(0.9) + math.log(0.2) + math.log(0.7) + math.log(0.3)) / 4
    assert nll(PROBS, LABELS) == pytest.approx(expected, rel=1e-12)


def test_nll_of_zero_probability_is_finite() -> None:
    """A zero probability on the label is clamped, not infinite."""
    value = nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert math.isfinite(value) and value == pytest.approx(-math.log(1e-12))


def test_ece_by_hand() -> None:
    """15 bins: bin 13 |1 - 0.9| * 1/4, bin 10 |0.5 - 0.7| * 2/4, bin 7 |0 - 0.5| * 1/4 -> 0.25.

    (Without binning, |mean acc - mean conf| would be 0.2.)"""
    expected = 0.25 * 0.1 + 0.5 * 0.2 + 0.25 * 0.5
    assert ece(PROBS, LABELS) == pytest.approx(expected, abs=1e-12)


def test_reliability_bins_by_hand() -> None:
    # confidences 0.9 (right), 0.55 (wrong), 0.7 (right) fall in bins 4, 2 and 3 of 5.
    probs = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1])
    bins = reliability(probs, labels, n_bins=5)
    assert [b["count"] for b in bins] == [0, 0, 1, 1, 1]
    assert [b["accuracy"] for b in bins] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert [b["confidence"] for b in bins] == pytest.approx([0.0, 0.0, 0.55, 0.7, 0.9])
    assert (bins[2]["low"], bins[2]["high"]) == (0.4, 0.6)
    assert ece(probs, labels, n_bins=5) == pytest.approx((0.55 + 0.3 + 0.1) / 3)


def test_ece_bins_are_closed_on_the_right() -> None:
    """A confidence of exactly 0.8 = 12/15 shares the bin (11/15, 12/15] with 0.75.

    Same bin: |0.5 - 0.775| = 0.275; separate bins would give (0.2 + 0.75) / 2 = 0.475."""
    probs = torch.tensor([[0.8, 0.2], [0.75, 0.25]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    assert ece(probs, labels) == pytest.approx(0.275, abs=1e-12)


def test_ece_confidence_one_counts() -> None:
    """Confidence 1.0 falls in the last bin: a confident mistake has ECE 1."""
    assert ece(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(1.0)


def test_perfect_predictions() -> None:
    """One-hot correct predictions: accuracy 1, NLL 0, ECE 0."""
    labels = torch.tensor([0, 2, 1, 2])
    probs = torch.nn.functional.one_hot(labels, 3).double()
    metrics = classification_metrics(probs, labels)
    assert metrics["accuracy"] == 1.0
    assert metrics["nll"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["ece"] == pytest.approx(0.0, abs=1e-12)


def test_float32_probabilities_accepted() -> None:
    """Float32 inputs (what the models produce) give the same metrics as float64 up to rounding."""
    m32 = classification_metrics(PROBS.float(), LABELS)
    m64 = classification_metrics(PROBS, LABELS)
    assert m32["accuracy"] == m64["accuracy"]
    assert m32["nll"] == pytest.approx(m64["nll"], rel=1e-6)
    assert m32["ece"] == pytest.approx(m64["ece"], abs=1e-6)


# --- learning-rate schedules ----------------------------------------------------------------------

TOTAL = 10_000


def test_onecycle_warms_up_then_decays() -> None:
    """onecycle: 0.01 at the start, 1.0 at 10%, rising before and falling after, ~1e-7 at the end."""
    values = [lr_factor("onecycle", s, TOTAL) for s in range(TOTAL + 1)]
    assert values[0] == pytest.approx(0.01)
    peak = TOTAL // 10
    assert values[peak] == pytest.approx(1.0)
    assert max(values) == pytest.approx(1.0) and values.index(max(values)) == peak
    assert all(a <= b for a, b in zip(values[:peak], values[1:peak + 1]))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:]))
    assert values[TOTAL] == pytest.approx(1e-7, rel=1e-3)
    assert values[TOTAL - 1] < 1e-6  # the last step actually taken


def test_cosine_starts_at_one_and_ends_near_zero() -> None:
    """cosine: 1.0 at the first step, 0.5 half way, ~0 at the end."""
    assert lr_factor("cosine", 0, TOTAL) == pytest.approx(1.0)
    assert lr_factor("cosine", TOTAL // 2, TOTAL) == pytest.approx(0.5)
    assert lr_factor("cosine", TOTAL - 1, TOTAL) < 1e-6
    assert lr_factor("cosine", TOTAL, TOTAL) == pytest.approx(0.0, abs=1e-12)


def test_constant_and_step() -> None:
    """constant is 1 throughout; step divides by 10 after one and two thirds."""
    assert {lr_factor("constant", s, 90) for s in range(90)} == {1.0}
    assert [lr_factor("step", s, 90) for s in (0, 29, 30, 59, 60, 89)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_unknown_schedule_is_rejected() -> None:
    with pytest.raises(ValueError, match="linear"):
        lr_factor("linear", 0, 10)


# --- Brier score, growth curve, diversity (hand-computed on tiny fixed inputs) --------------------------


def test_brier_by_hand() -> None:
    """[1, 0] on label 0 costs 0; [0.5, 0.5] on label 1 costs 0.25 + 0.25: mean 0.25."""
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert brier(probs, torch.tensor([0, 1])) == pytest.approx(0.25)
    assert brier(torch.tensor([[0.0, 1.0]]), torch.tensor([0])) == pytest.approx(2.0)


def test_disagreement_by_hand() -> None:
    p1 = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    p2 = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.8, 0.2]])
    assert disagreement(p1, p2) == pytest.approx(1 / 3)
    assert disagreement(p1, p1) == 0.0


def test_kl_by_hand() -> None:
    """KL([.5, .5] || [.25, .75]) = .5 ln 2 + .5 ln(2/3); identical members give 0."""
    p1, p2 = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
    assert kl_divergence(p1, p2) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert kl_divergence(p1, p1) == pytest.approx(0.0, abs=1e-12)


def test_output_correlation_by_hand() -> None:
    """Two-class outputs are perfectly correlated or anti-correlated."""
    p1 = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    assert output_correlation(p1, p1) == pytest.approx(1.0)
    assert output_correlation(p1, p1.flip(1)) == pytest.approx(-1.0)
    # centred: (-2, -1/2, 5/2)/15 and (5/2, -1/2, -2)/15 -> (-5 + 1/4 - 5) / (4 + 1/4 + 25/4) = -13/14
    p3 = torch.tensor([[0.2, 0.3, 0.5]])
    p4 = torch.tensor([[0.5, 0.3, 0.2]])
    assert output_correlation(p3, p4) == pytest.approx(-13 / 14)


def test_linear_cka_properties() -> None:
    """CKA of a representation with itself is 1, and it ignores rotations and isotropic scaling."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3 * x @ q) == pytest.approx(1.0)
    y = torch.randn(50, 4, generator=gen)
    assert 0 < linear_cka(x, y) < 0.5


def test_growth_curve_ends_at_the_ensemble() -> None:
    labels = torch.tensor([0, 1])
    members = [torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([[0.5, 0.5], [0.2, 0.8]])]
    curve = growth_curve(members, labels)
    assert [c["members"] for c in curve] == [1, 2]
    assert curve[0]["accuracy"] == 0.5 and curve[1]["accuracy"] == 1.0
    assert curve[1]["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.6)) / 2)


def test_diversity_of_identical_members_is_zero() -> None:
    probs = torch.tensor([[0.7, 0.3], [0.1, 0.9]])
    feats = torch.tensor([[1.0, 2.0], [3.0, 1.0], [0.0, 1.0]])
    result = diversity([probs, probs, probs], [feats, feats, feats])
    assert result["disagreement"]["mean"] == 0.0
    assert result["kl"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert result["correlation"]["mean"] == pytest.approx(1.0)
    assert result["cka"]["mean"] == pytest.approx(1.0)
    assert len(result["kl"]["matrix"]) == 3 and result["kl"]["matrix"][0][0] == pytest.approx(0.0, abs=1e-12)
