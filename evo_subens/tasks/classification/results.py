"""What a classification run reports: test and validation metrics of parent, members and ensemble,
temperature scaling, the ensemble's gain over its parent, the verdict, and the printed summary.

Subnetwork runs and baselines share :func:`ensemble_test_metrics`, so both write ``metrics.json`` in the
same shape.
"""

from __future__ import annotations

import math

import torch

from ...core.progress import generation_span
from .calibration import temperature_scaled
from .data import Split
from .metrics import classification_metrics, diversity, ensemble_gain, growth_curve, reliability


def ensemble_test_metrics(member_probs: list[torch.Tensor], member_features: list[torch.Tensor],
                          labels: torch.Tensor, member_ids: list[dict]) -> dict:
    """Test metrics of an ensemble (mean of ``member_probs``) and of each member (tagged with
    ``member_ids``): the keys every ``metrics.json`` has."""
    ensemble_probs = torch.stack(member_probs).mean(dim=0)
    return {
        "ensemble": classification_metrics(ensemble_probs, labels),
        "reliability": {"ensemble": reliability(ensemble_probs, labels)},
        "members": [dict(classification_metrics(p, labels), **tag) for p, tag in zip(member_probs, member_ids)],
        "growth": growth_curve(member_probs, labels),
        "diversity": diversity(member_probs, member_features),
        "test_samples": len(labels),
    }


def with_parent(parent_probs: torch.Tensor, labels: torch.Tensor, ensemble: dict) -> dict:
    """``ensemble``'s test metrics with the parent's in front (a subnetwork run's ``metrics.json`` order)."""
    out = {"parent": classification_metrics(parent_probs, labels), "ensemble": ensemble["ensemble"],
           "reliability": {"parent": reliability(parent_probs, labels), **ensemble["reliability"]}}
    out.update((key, value) for key, value in ensemble.items() if key not in out)
    return out


def validation_metrics(validation: Split, selection_size: int, held_back: bool, parent_probs: torch.Tensor,
                       member_probs: list[torch.Tensor], test: dict, test_probs: dict[str, torch.Tensor],
                       test_y: torch.Tensor) -> dict:
    """Validation metrics of parent and ensemble (selection part and held-back part), temperature scaling
    fitted on the whole validation split, and the ensemble's gain over the parent split into member cost
    and diversity (test, and held-back validation)."""
    y = validation.y
    ensemble_probs = torch.stack(member_probs).mean(dim=0)
    n = selection_size  # hold_out keeps the head of the validation split for decisions, the tail held back

    def part(probs: torch.Tensor, held: bool) -> dict:
        return classification_metrics(probs[n:], y[n:]) if held else classification_metrics(probs[:n], y[:n])

    out = {"validation": {"parent": part(parent_probs, False), "ensemble": part(ensemble_probs, False),
                          "samples": n},
           "holdout": None,
           "temperature": {"parent": temperature_scaled(parent_probs, y, test_probs["parent"], test_y),
                           "ensemble": temperature_scaled(ensemble_probs, y, test_probs["ensemble"], test_y)},
           "gain": {"test": ensemble_gain(test["parent"], test["members"], test["ensemble"]), "holdout": None}}
    out["paired"] = {"test": paired_difference(test_probs["parent"], test_probs["ensemble"], test_y),
                     "holdout": None}
    if held_back:
        out["holdout"] = {"parent": part(parent_probs, True), "ensemble": part(ensemble_probs, True),
                          "samples": len(y) - n}
        out["gain"]["holdout"] = ensemble_gain(out["holdout"]["parent"], [part(p, True) for p in member_probs],
                                               out["holdout"]["ensemble"])
        out["paired"]["holdout"] = paired_difference(parent_probs[n:], ensemble_probs[n:], y[n:])
    return out


def paired_difference(parent_probs: torch.Tensor, ensemble_probs: torch.Tensor, labels: torch.Tensor,
                      eps: float = 1e-12) -> dict:
    """The ensemble minus the parent, row by row on the same rows: the mean difference in correctness (accuracy
    points) and in NLL, each with its paired standard error (the standard deviation of the per-row differences
    over sqrt(rows)). Both models err on the same hard rows, so pairing removes most of the noise a
    comparison of two separate means would carry."""
    rows = len(labels)
    correct = [(p.argmax(dim=1) == labels).double() for p in (parent_probs, ensemble_probs)]
    losses = [-p.double().gather(1, labels.view(-1, 1)).squeeze(1).clamp_min(eps).log()
              for p in (parent_probs, ensemble_probs)]

    def mean_se(diff: torch.Tensor) -> tuple[float, float]:
        se = diff.std(unbiased=True).item() / math.sqrt(rows) if rows > 1 else math.nan
        return diff.mean().item(), se

    accuracy, accuracy_se = mean_se(correct[1] - correct[0])
    nll_diff, nll_se = mean_se(losses[1] - losses[0])
    return {"rows": rows, "accuracy_points": 100 * accuracy, "accuracy_se_points": 100 * accuracy_se,
            "nll_diff": nll_diff, "nll_se": nll_se, "parent_nll": losses[0].mean().item()}


# A difference counts as real beyond this many paired standard errors (about 95% two-sided).
CLEAR_SE = 2.0


def _direction(diff: float, se: float | None, better_if_lower: bool) -> int:
    """+1 when ``diff`` is clearly better for the ensemble, -1 clearly worse, 0 within ``CLEAR_SE``
    standard errors (always 0 when no standard error is known)."""
    if se is None or math.isnan(se) or abs(diff) <= CLEAR_SE * se or diff == 0:
        return 0
    return 1 if (diff < 0) == better_if_lower else -1


def difference(parent: dict, ensemble: dict, paired: dict | None = None) -> dict:
    """The ensemble against the parent on one set of rows: accuracy difference (points), relative NLL change,
    and, from the ``paired`` per-row differences (:func:`paired_difference`), their standard errors and an
    ``outcome``: ``better`` (a difference beyond 2 standard errors in the ensemble's favour and none against
    it), ``worse``, ``mixed`` or ``no clear difference``. ``beats_parent`` is ``outcome == "better"``;
    without ``paired`` (metrics written before per-row differences were recorded) there is no outcome and
    ``beats_parent`` only compares the signs."""
    accuracy = 100 * (ensemble["accuracy"] - parent["accuracy"])
    change = (ensemble["nll"] - parent["nll"]) / parent["nll"] if parent["nll"] > 0 else 0.0
    out = {"accuracy_points": accuracy, "nll_change": change}
    if paired is None:
        # On a few hundred held-back samples accuracy often ties; a tie with a lower NLL is not a loss.
        return dict(out, beats_parent=accuracy >= 0 and change < 0)
    directions = {_direction(paired["accuracy_points"], paired["accuracy_se_points"], better_if_lower=False),
                  _direction(paired["nll_diff"], paired["nll_se"], better_if_lower=True)}
    outcome = ("mixed" if directions >= {1, -1} else "better" if 1 in directions else
               "worse" if -1 in directions else "no clear difference")
    scale = paired["parent_nll"] if paired["parent_nll"] > 0 else math.nan
    return dict(out, rows=paired["rows"], accuracy_se_points=paired["accuracy_se_points"],
                nll_change_se=paired["nll_se"] / scale, outcome=outcome, beats_parent=outcome == "better")


def verdict(metrics: dict) -> dict:
    """Ensemble vs parent on test and on held-back validation (None without one)."""
    held = metrics.get("holdout")
    paired = metrics.get("paired") or {}
    return {"test": difference(metrics["parent"], metrics["ensemble"], paired.get("test")),
            "holdout": difference(held["parent"], held["ensemble"], paired.get("holdout")) if held else None}


OUTCOME_WORDS = {"better": "the ensemble is better", "worse": "the ensemble is worse",
                 "mixed": "mixed (one measure better, the other worse)",
                 "no clear difference": "no clear difference (within 2 standard errors)"}


def describe_difference(difference: dict) -> str:
    """``accuracy +0.80 pt +- 0.30, NLL -18.3% +- 2.1%``: the differences with one paired standard error each
    (where recorded)."""
    if "outcome" not in difference:
        return f"accuracy {difference['accuracy_points']:+.2f} pt, NLL {100 * difference['nll_change']:+.1f}%"
    return (f"accuracy {difference['accuracy_points']:+.2f} pt +- {difference['accuracy_se_points']:.2f}, "
            f"NLL {percent(difference['nll_change'], sign=True)} +- {percent(difference['nll_change_se'])}")


def percent(share: float, sign: bool = False) -> str:
    """``share`` in percent: one decimal, two below 1% (a 0.04% change is not written as 0.0%)."""
    value = 100 * share
    digits = 2 if abs(value) < 1 else 1
    return f"{value:+.{digits}f}%" if sign else f"{value:.{digits}f}%"


def describe_verdict(difference: dict, where: str) -> str:
    """``on test (2,000 rows): the ensemble is better: accuracy ...``, or without recorded standard errors
    the bare differences."""
    if "outcome" not in difference:
        return f"on {where}: {describe_difference(difference)} (no per-row standard error recorded)"
    return (f"on {where} ({difference['rows']:,} rows): {OUTCOME_WORDS[difference['outcome']]}: "
            f"{describe_difference(difference)}")


def warnings(metrics: dict) -> list[str]:
    """Loud lines for a run whose ensemble is not clearly better than its parent on held-back validation
    (or, without a held-back part, on test)."""
    verdict = metrics["verdict"]
    checked, where = (verdict["holdout"], "held-back validation") if verdict["holdout"] else \
        (verdict["test"], "test")
    if checked["beats_parent"]:
        return []
    return [f"WARNING: the ensemble is not clearly better than its parent {describe_verdict(checked, where)}; "
            f"see 'gain' in metrics.json: fine-tuning members (finetune.epochs) or a different child family may "
            f"help"]


def diversity_line(metrics: dict) -> str:
    """Mean pairwise member diversity; with one member there are no pairs, so nothing to measure."""
    if len(metrics["members"]) < 2:
        return "member diversity: n/a (one member: no pairs to compare)"
    spread = metrics["diversity"]
    return (f"member diversity: disagreement {spread['disagreement']['mean']:.4f}  KL {spread['kl']['mean']:.4f}  "
            f"output corr {spread['correlation']['mean']:.4f}  feature CKA {spread['cka']['mean']:.4f}")


def search_line(search: dict, planned: int | None = None, patience: int | None = None) -> str:
    """How many generations ran (of ``planned``), why fewer, and whether a later one beat generation 0 on
    held-back validation."""
    ran = search["generations_run"]
    line = f"search: {ran} of {planned} generation(s) ran" if planned else f"search: {ran} generation(s) ran"
    if search["stopped_early"] and (planned is None or ran < planned):
        line += (f", stopped early after generation {ran - 1}"
                 + (f" ({patience} without a better best candidate, search.patience)" if patience else ""))
    elif planned and ran < planned:
        line += f"; {generation_span(ran, planned - 1)} not run"
    later = search["later_generations_beat_first"]
    if later is not None:
        # Tuned scoring checks the ensemble chosen after each generation; raw scoring its best candidate.
        what = "ensemble" if "ensemble_nll" in search["generations"][0] else "best"
        line += (f"; a later generation's {what} beat generation 0's on held-back validation" if later else
                 f"; no later generation's {what} beat generation 0's on held-back validation")
    return line


def summary_table(metrics: dict, offered: int, planned: int | None = None, patience: int | None = None) -> str:
    """The test table, diversity, NLL gain, search and verdict lines printed at the end of a run
    (``planned``, ``patience``: the run's search.generations and search.patience)."""
    best = metrics["members"][0]
    scaled = metrics["temperature"]
    rows = [("parent", metrics["parent"], scaled["parent"]["test"]), ("best member", best, None),
            (f"ensemble ({len(metrics['members'])}/{offered})", metrics["ensemble"], scaled["ensemble"]["test"])]
    lines = [f"{'test split':<18}{'accuracy':>10}{'nll':>10}{'ece':>10}{'nll (TS)':>10}{'ece (TS)':>10}"]
    for name, m, ts in rows:
        cells = f"{ts['nll']:>10.4f}{ts['ece']:>10.4f}" if ts else f"{'':>20}"
        lines.append(f"{name:<18}{m['accuracy']:>10.4f}{m['nll']:>10.4f}{m['ece']:>10.4f}{cells}")
    lines.append(diversity_line(metrics))
    gain = metrics["gain"]["test"]["nll"]
    lines.append(f"NLL gain over the parent {gain['gain']:+.4f} = diversity {gain['diversity']:+.4f} "
                 f"- member cost {gain['member_cost']:+.4f} (mean member {gain['mean_member']:.4f})")
    if metrics.get("search"):
        lines.append(search_line(metrics["search"], planned, patience))
    line = f"verdict: ensemble vs parent {describe_verdict(metrics['verdict']['test'], 'test')}"
    if metrics["verdict"]["holdout"]:
        line += f"; {describe_verdict(metrics['verdict']['holdout'], 'held-back validation')}"
    lines.append(line)
    return "\n".join(lines)
