"""What reports and progress lines claim: generations named by one index everywhere, parent and candidates on the
same rows, differences called only beyond their noise, and what did not happen (an early stop, generations not
run, a single member) said rather than drawn as zeros. Unit tests on small synthetic logs and metrics."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from evo_subens.core.checkpoint import describe_stop, load_latest_checkpoint, save_checkpoint
from evo_subens.core.divergence import TieWarning, check_generation, generation_note, tie_note
from evo_subens.core.progress import after_generations, generation_name, generation_span
from evo_subens.core.search import Ranking
from evo_subens.errors import DivergedError
from evo_subens.report.fitness import axis_limits, fitness_lines, fitness_plot, search_extent
from evo_subens.report.run_report import _diversity_section, _gain_section, _selection_rows
from evo_subens.tasks.classification.metrics import VALIDATION_METRICS
from evo_subens.tasks.classification.results import (difference, paired_difference, summary_table, verdict,
                                                     warnings)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- generation numbers ------------------------------------------------------------------------------------


def test_generations_are_named_by_their_log_index() -> None:
    assert generation_name(0, 3) == "generation 0 (1 of 3)"
    assert generation_name(2) == "generation 2"
    assert after_generations(2, 4) == "after generation 1 (2 of 4)"
    assert after_generations(0, 4) == "before generation 0"
    assert generation_span(2, 3) == "generations 2-3" and generation_span(3, 3) == "generation 3"


def _checkpoint(run_dir: Path, done: int, planned: int) -> None:
    save_checkpoint(run_dir, {"stage": "search", "config": {"search": {"generations": planned}}, "parent_id": "p",
                              "search": {"generation": done}, "members": [], "tuned": 0})


def test_a_stopped_search_is_described_with_the_log_index(tmp_path: Path) -> None:
    """Two generations done of four: the last one in population.parquet is generation 1."""
    _checkpoint(tmp_path, done=2, planned=4)
    assert describe_stop(tmp_path) == "after generation 1 (2 of 4)"
    lines: list[str] = []
    load_latest_checkpoint(tmp_path, lines.append)
    assert lines == ["[resume] from ckpt-000001.pt: stage search, after generation 1 (2 of 4)"]


class _Family:
    def settings(self, row: dict) -> str:
        return ""

    def divergence_advice(self) -> str:
        return "a smaller children.sigma"


def test_divergence_messages_use_the_log_index() -> None:
    rows = [{"generation": 0, "diverged": True}, {"generation": 0, "diverged": False}]
    assert "1 of 2 candidates of generation 0 diverged" in generation_note(rows, 0, _Family())
    with pytest.raises(DivergedError, match="every candidate of generation 1 diverged"):
        check_generation([{"generation": 1, "diverged": True}], 1, _Family(), "runs/x")


# --- tied fitness ------------------------------------------------------------------------------------------


def _records(values: list[float], generation: int = 0) -> list[SimpleNamespace]:
    return [SimpleNamespace(fitness=v, diverged=False, raced=False, generation=generation) for v in values]


def test_most_candidates_tying_on_the_fitness_is_warned_about() -> None:
    ranking = Ranking(VALIDATION_METRICS, "accuracy")
    note = tie_note(_records([1.0] * 7 + [0.98]), ranking, "selection split (57 of 114 validation rows)")
    assert note.startswith("[search] warning: 7 of 8 candidates of generation 0 tie at val acc 1.0000 on the "
                           "selection split (57 of 114 validation rows)")
    assert "search.fitness: nll" in note
    assert tie_note(_records([1.0, 1.0, 0.9, 0.8]), ranking, "rows") is None  # half is not most
    assert tie_note(_records([0.9, 0.8, 0.7]), ranking, "rows") is None


def test_the_tie_warning_is_said_once_per_run() -> None:
    ties = TieWarning(Ranking(VALIDATION_METRICS, "accuracy"), "rows")
    assert ties.check(_records([0.9, 0.8, 0.7], 0)) is None
    assert "generation 1" in ties.check(_records([1.0] * 4, 1))
    assert ties.check(_records([1.0] * 4, 2)) is None


# --- the verdict -------------------------------------------------------------------------------------------


def _probs(correct_p: list[float], labels: torch.Tensor) -> torch.Tensor:
    """Two-class probabilities giving each row's label the probability ``correct_p``."""
    p = torch.tensor(correct_p, dtype=torch.float64)
    probs = torch.stack([1 - p, p], dim=1)
    return torch.where(labels.view(-1, 1) == 1, probs, probs.flip(1))


def _metrics(parent: torch.Tensor, ensemble: torch.Tensor, labels: torch.Tensor) -> dict:
    from evo_subens.tasks.classification.metrics import classification_metrics

    return {"parent": classification_metrics(parent, labels), "ensemble": classification_metrics(ensemble, labels),
            "paired": {"test": paired_difference(parent, ensemble, labels), "holdout": None}}


def test_a_small_difference_on_few_rows_is_no_clear_difference() -> None:
    """114 rows, the same predictions, a lower NLL on a handful of them: within noise, not a win."""
    labels = torch.tensor([0, 1] * 57)
    parent = [0.9] * 114
    ensemble = [0.9] * 110 + [0.97] * 3 + [0.8]
    metrics = _metrics(_probs(parent, labels), _probs(ensemble, labels), labels)
    test = verdict(metrics)["test"]
    assert test["nll_change"] < 0 and test["accuracy_points"] == 0  # a sign test alone says "beats its parent"
    assert test["outcome"] == "no clear difference" and not test["beats_parent"]
    assert test["rows"] == 114


def test_a_consistent_gain_is_better_and_a_consistent_loss_worse() -> None:
    labels = torch.tensor([0, 1] * 200)
    parent, better = _probs([0.7] * 400, labels), _probs([0.8 + 0.0001 * (i % 7) for i in range(400)], labels)
    assert verdict(_metrics(parent, better, labels))["test"]["outcome"] == "better"
    assert verdict(_metrics(better, parent, labels))["test"]["outcome"] == "worse"


def test_paired_standard_errors_are_those_of_the_per_row_differences() -> None:
    labels = torch.tensor([0, 1, 1, 0, 1])
    parent = _probs([0.6, 0.7, 0.4, 0.9, 0.8], labels)
    ensemble = _probs([0.7, 0.6, 0.6, 0.9, 0.3], labels)
    paired = paired_difference(parent, ensemble, labels)
    nll_rows = torch.log(torch.tensor([0.6, 0.7, 0.4, 0.9, 0.8])) - torch.log(torch.tensor([0.7, 0.6, 0.6, 0.9, 0.3]))
    correct_rows = torch.tensor([0.0, 0, 1, 0, -1])
    assert paired["rows"] == 5
    assert paired["nll_diff"] == pytest.approx(nll_rows.mean().item(), rel=1e-6)
    assert paired["nll_se"] == pytest.approx(nll_rows.std().item() / math.sqrt(5), rel=1e-5)
    assert paired["accuracy_points"] == pytest.approx(0.0)
    assert paired["accuracy_se_points"] == pytest.approx(100 * correct_rows.std().item() / math.sqrt(5))


def test_metrics_without_per_row_data_keep_the_sign_comparison() -> None:
    old = difference({"accuracy": 0.9, "nll": 0.3}, {"accuracy": 0.9, "nll": 0.29})
    assert old["beats_parent"] and "outcome" not in old


def _summary_metrics(members: int, outcome_rows: int = 114) -> dict:
    labels = torch.tensor([0, 1] * (outcome_rows // 2))
    same = _probs([0.9] * outcome_rows, labels)
    base = _metrics(same, same, labels)
    m = {"accuracy": 0.9, "nll": 0.3, "ece": 0.01}
    metrics = {"parent": m, "ensemble": m, "members": [dict(m, candidate=i) for i in range(members)],
               "temperature": {"parent": {"test": m, "temperature": 1.0}, "ensemble": {"test": m, "temperature": 1.0}},
               "diversity": {k: {"mean": 0.0} for k in ("disagreement", "kl", "correlation", "cka")},
               "gain": {"test": {"nll": {"parent": 0.3, "ensemble": 0.3, "gain": 0.0, "diversity": 0.0,
                                         "member_cost": 0.0, "mean_member": 0.3}}, "holdout": None},
               "search": {"generations_run": 2, "stopped_early": True, "later_generations_beat_first": None,
                          "generations": []},
               "paired": base["paired"], "holdout": None, "test_samples": outcome_rows}
    metrics["verdict"] = verdict(metrics)
    return metrics


def test_summary_says_what_did_not_happen() -> None:
    """One member: diversity n/a, not zeros; 2 of 4 generations, stopped early; the verdict counts rows."""
    text = summary_table(_summary_metrics(members=1), offered=1, planned=4, patience=1)
    assert "member diversity: n/a (one member" in text and "disagreement 0.0000" not in text
    assert "search: 2 of 4 generation(s) ran, stopped early after generation 1" in text
    assert "verdict: ensemble vs parent on test (114 rows): no clear difference" in text
    assert "disagreement 0.0000" in summary_table(_summary_metrics(members=2), offered=2)


def test_the_warning_says_not_clearly_better_with_rows() -> None:
    [line] = warnings(_summary_metrics(members=2))
    assert line.startswith("WARNING: the ensemble is not clearly better than its parent on test (114 rows): "
                           "no clear difference")


# --- report.md ---------------------------------------------------------------------------------------------


def test_report_verdict_counts_rows_and_claims_nothing_within_noise() -> None:
    lines = "\n".join(_gain_section(_summary_metrics(members=2)))
    assert "- On the test split (114 rows): no clear difference (within 2 standard errors)" in lines
    assert "beats" not in lines and "paired standard errors" in lines
    old = _summary_metrics(members=2)
    old["verdict"] = {"test": difference(old["parent"], dict(old["ensemble"], nll=0.29)), "holdout": None}
    assert "(no standard error recorded" in "\n".join(_gain_section(old))


def test_report_diversity_of_one_member_is_not_applicable(tmp_path: Path) -> None:
    lines = _diversity_section(_summary_metrics(members=1), tmp_path)
    assert "n/a (one member)" in "\n".join(lines) and not (tmp_path / "diversity.png").exists()


def test_selection_rows_are_named() -> None:
    assert _selection_rows({"validation": {"samples": 57}, "holdout": {"samples": 57}}) == \
        "selection split (57 of 114 validation rows)"
    assert _selection_rows({"validation": {"samples": 57}, "holdout": None}) == "validation split (57 rows)"


def _population(generations: int, per: int = 8, outlier: float | None = None) -> pd.DataFrame:
    rows = [{"generation": -1, "val_nll": 0.0973, "val_accuracy": 0.95}]
    for g in range(generations):
        for c in range(per):
            rows.append({"generation": g, "val_nll": 0.09 + 0.002 * c, "val_accuracy": 0.95})
    if outlier is not None:
        rows[-1]["val_nll"] = outlier
    return pd.DataFrame(rows)


def test_search_extent_counts_what_ran() -> None:
    text = search_extent(_population(2), 4, {"stopped_early": True}, patience=1)
    assert text.startswith("8 candidates x 2 of 4 planned generations (stopped early after generation 1: 1 "
                           "generation(s) without a better best candidate")
    assert text.endswith("generations 2-3 not run)")
    assert search_extent(_population(3), 3, {"stopped_early": False}) == "8 candidates x 3 generations"
    assert search_extent(None, 4, {"generations_run": 3, "stopped_early": False}).endswith("(generation 3 not run)")


def test_the_parent_line_is_the_reference_row_on_the_candidates_rows() -> None:
    """The whole-split parent value (0.1078) is ignored when the log has the reference row (0.0973); the
    reference row is not drawn as a generation."""
    lines = fitness_lines(_population(2), "nll", 0.1078)
    assert lines.parent == pytest.approx(0.0973)
    assert list(lines.best.index) == [0, 1] and lines.best.iloc[0] == pytest.approx(0.09)
    tuned = fitness_lines(_population(2), "nll", 0.1078, tuned_reference=True)
    assert tuned.parent == pytest.approx(0.1078) and tuned.tuned_parent == pytest.approx(0.0973)


def test_a_worst_outlier_is_clipped_not_squashing_the_axis() -> None:
    low, high, clipped = axis_limits([0.09, 0.10, 0.0973], [0.104, 3.0], lower_is_better=True)
    assert clipped == [1] and low < 0.09 and 0.104 < high < 0.2
    low, high, clipped = axis_limits([0.09, 0.10], [0.104, 0.105], lower_is_better=True)
    assert clipped == [] and high > 0.105
    low, high, clipped = axis_limits([0.95, 0.97], [0.94, 0.10], lower_is_better=False)
    assert clipped == [1] and 0.10 < low < 0.94


def test_fitness_plot_notes_clipping_and_generations_not_run(tmp_path: Path) -> None:
    notes = fitness_plot(_population(2, outlier=3.0), "nll", None, tmp_path / "fitness.png", planned=4,
                         stopped_early=True, rows="selection split (57 of 114 validation rows)")
    assert (tmp_path / "fitness.png").read_bytes()[:8] == PNG_MAGIC
    text = " ".join(notes)
    assert "generations 2-3 did not run (the search stopped early" in text
    assert "lies above the plotted range (up to 3)" in text
    assert fitness_plot(_population(3), "nll", None, tmp_path / "f.png", planned=3) == []


def test_a_one_member_baseline_prints_no_disagreement_of_zero() -> None:
    from evo_subens.tasks.classification.baselines import _summary

    metrics = _summary_metrics(members=1)
    metrics["cost"] = {"train_epochs": 2, "train_sample_passes": 10, "eval_forward_passes": 5}
    assert "disagreement n/a (one member)" in _summary(SimpleNamespace(method="single"), metrics)
    metrics["members"].append(metrics["members"][0])
    assert "disagreement 0.0000" in _summary(SimpleNamespace(method="snapshot"), metrics)


def test_report_names_the_ensemble_rule_that_chose() -> None:
    from conftest import tiny_dict

    from evo_subens.core.config import config_from_dict, config_to_dict
    from evo_subens.families.noisy import NoisyFamily
    from evo_subens.report.run_report import _describe_config

    config = config_to_dict(config_from_dict(tiny_dict("/tmp/unused", {"search": {"scoring": "tuned", "fitness": "nll"},
                                                                        "finetune": {"epochs": 1}})))
    family = NoisyFamily(config_from_dict(config).children)
    metrics = {"members": [{}] * 3, "test_samples": 2000, "search": {"generations_run": 2, "stopped_early": False}}
    text = _describe_config(config, metrics, family, _population(2))
    assert "ensemble of 3 (greedy from the parent and every tuned candidate)" in text and "2,000 test samples" in text
    config["search"]["scoring"] = "raw"
    assert "(topk selection)" in _describe_config(config, metrics, family, _population(2))
