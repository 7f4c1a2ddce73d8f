"""What a classification run reports: test and validation metrics of parent, members and ensemble,
temperature scaling, the ensemble's gain over its parent, the verdict, and the printed summary.

Subnetwork runs and baselines share :func:`ensemble_test_metrics`, so both write ``metrics.json`` in the
same shape.
"""

from __future__ import annotations

import torch

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
    if held_back:
        out["holdout"] = {"parent": part(parent_probs, True), "ensemble": part(ensemble_probs, True),
                          "samples": len(y) - n}
        out["gain"]["holdout"] = ensemble_gain(out["holdout"]["parent"], [part(p, True) for p in member_probs],
                                               out["holdout"]["ensemble"])
    return out


def difference(parent: dict, ensemble: dict) -> dict:
    """Accuracy difference (points) and relative NLL change of the ensemble against the parent."""
    accuracy = 100 * (ensemble["accuracy"] - parent["accuracy"])
    change = (ensemble["nll"] - parent["nll"]) / parent["nll"] if parent["nll"] > 0 else 0.0
    # On a few hundred held-back samples accuracy often ties; a tie with a lower NLL is not a loss.
    return {"accuracy_points": accuracy, "nll_change": change, "beats_parent": accuracy >= 0 and change < 0}


def verdict(metrics: dict) -> dict:
    """Ensemble vs parent on test and on held-back validation (None without one)."""
    held = metrics.get("holdout")
    return {"test": difference(metrics["parent"], metrics["ensemble"]),
            "holdout": difference(held["parent"], held["ensemble"]) if held else None}


def describe_difference(difference: dict) -> str:
    return f"accuracy {difference['accuracy_points']:+.2f} pt, NLL {100 * difference['nll_change']:+.1f}%"


def warnings(metrics: dict) -> list[str]:
    """Loud lines for a run whose ensemble is no better than its parent on held-back validation (or, without
    a held-back part, on test)."""
    verdict = metrics["verdict"]
    checked, where = (verdict["holdout"], "held-back validation") if verdict["holdout"] else \
        (verdict["test"], "the test split")
    if checked["beats_parent"]:
        return []
    return [f"WARNING: the ensemble does not beat its parent on {where} ({describe_difference(checked)}); "
            f"see 'gain' in metrics.json: fine-tuning members (finetune.epochs) or a different child family may "
            f"help"]


def summary_table(metrics: dict, offered: int) -> str:
    """The test table, diversity, NLL gain, search and verdict lines printed at the end of a run."""
    best = metrics["members"][0]
    scaled = metrics["temperature"]
    rows = [("parent", metrics["parent"], scaled["parent"]["test"]), ("best member", best, None),
            (f"ensemble ({len(metrics['members'])}/{offered})", metrics["ensemble"], scaled["ensemble"]["test"])]
    lines = [f"{'test split':<18}{'accuracy':>10}{'nll':>10}{'ece':>10}{'nll (TS)':>10}{'ece (TS)':>10}"]
    for name, m, ts in rows:
        cells = f"{ts['nll']:>10.4f}{ts['ece']:>10.4f}" if ts else f"{'':>20}"
        lines.append(f"{name:<18}{m['accuracy']:>10.4f}{m['nll']:>10.4f}{m['ece']:>10.4f}{cells}")
    spread = metrics["diversity"]
    lines.append(f"member diversity: disagreement {spread['disagreement']['mean']:.4f}  "
                 f"KL {spread['kl']['mean']:.4f}  output corr {spread['correlation']['mean']:.4f}  "
                 f"feature CKA {spread['cka']['mean']:.4f}")
    gain = metrics["gain"]["test"]["nll"]
    lines.append(f"NLL gain over the parent {gain['gain']:+.4f} = diversity {gain['diversity']:+.4f} "
                 f"- member cost {gain['member_cost']:+.4f} (mean member {gain['mean_member']:.4f})")
    search = metrics["search"]
    if search["later_generations_beat_first"] is not None:
        # Tuned scoring checks the ensemble chosen after each generation; raw scoring its best candidate.
        what = "ensemble" if "ensemble_nll" in search["generations"][0] else "best"
        lines.append(f"search: {search['generations_run']} generation(s)"
                     + (", stopped early" if search["stopped_early"] else "")
                     + (f"; a later generation's {what} beat generation 0's on held-back validation"
                        if search["later_generations_beat_first"] else
                        f"; no later generation's {what} beat generation 0's on held-back validation"))
    line = f"verdict: ensemble vs parent on test: {describe_difference(metrics['verdict']['test'])}"
    if metrics["verdict"]["holdout"]:
        line += f"; on held-back validation: {describe_difference(metrics['verdict']['holdout'])}"
    lines.append(line)
    return "\n".join(lines)
