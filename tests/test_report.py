"""Reports (report.md + PNGs), the mutation-window sweep, the selection comparison, loading an ensemble
back, and feature visualisation."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import torch
from conftest import tiny_dict

from evo_subens.core.config import config_from_dict
from evo_subens.ensemble import load_ensemble
from evo_subens.errors import ConfigError, RunDirError
from evo_subens.report.featvis import maximise_units, pick_units, starting_inputs, unit_activations
from evo_subens.tasks.classification.data import load_dataset
from evo_subens.tasks.classification.metrics import classification_metrics
from evo_subens.report.run_report import write_report
from evo_subens.core.runner import run

SWEEP = {"children": {"density_grid": [1.0, 0.1], "sigma_grid": [0.1, 2.0]}, "search": {"generations": 1}}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One folder with a swept run and a plain two-generation run (greedy selection), both finished."""
    folder = tmp_path_factory.mktemp("report-runs")
    run(tiny_dict(folder, dict(SWEEP, name="sweep-s0")), progress=lambda line: None)
    run(tiny_dict(folder, {"name": "plain-s0", "ensemble": {"selection": "greedy"}}), progress=lambda line: None)
    run(tiny_dict(folder, {"name": "snapshot-s0", "method": "snapshot", "baseline": {"members": 2}}),
        progress=lambda line: None)
    return folder


def _images(report: Path) -> list[Path]:
    text = report.read_text()
    return [report.parent / line.split("(")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]


@pytest.mark.slow
def test_report_writes_markdown_and_readable_pngs(runs):
    report = write_report(runs / "sweep-s0", progress=lambda line: None)
    text = report.read_text()
    for section in ("## Test split", "## Ensemble selection", "## Search", "## Mutation window", "## Ensemble size",
                    "## Member diversity", "## Calibration", "## Feature visualisation"):
        assert section in text
    images = _images(report)
    assert {p.name for p in images} == {"fitness.png", "mutation_window.png", "growth.png", "diversity.png",
                                        "reliability.png", "features.png"}
    for image in images:
        assert image.read_bytes()[:8] == PNG_MAGIC
        height, width = matplotlib.image.imread(image).shape[:2]
        assert height > 200 and width > 300


@pytest.mark.slow
def test_mutation_window_only_for_sweeps(runs):
    report = write_report(runs / "plain-s0", features=False, progress=lambda line: None)
    text = report.read_text()
    assert "Mutation window" not in text and not (runs / "plain-s0" / "mutation_window.png").exists()
    assert "Feature visualisation" not in text
    assert "greedy (used)" in text


@pytest.mark.slow
def test_folder_report_groups_runs_and_links_each(runs):
    report = write_report(runs, features=False, progress=lambda line: None)
    text = report.read_text()
    assert report == runs / "report.md"
    assert "| sweep | 1 |" in text and "| plain | 1 |" in text and "| snapshot | 1 |" in text
    assert "(sweep-s0/report.md)" in text and (runs / "plain-s0" / "report.md").is_file()


@pytest.mark.slow
def test_report_on_a_baseline_run(runs):
    report = write_report(runs / "snapshot-s0", progress=lambda line: None)
    text = report.read_text()
    assert "method **snapshot**" in text and "## Search" not in text and "parent |" not in text
    assert {p.name for p in _images(report)} == {"growth.png", "diversity.png", "reliability.png", "features.png"}


def test_report_rejects_a_folder_without_runs(tmp_path):
    with pytest.raises(RunDirError, match="no finished run"):
        write_report(tmp_path, progress=lambda line: None)
    with pytest.raises(RunDirError, match="neither a run directory"):
        write_report(tmp_path / "missing", progress=lambda line: None)


@pytest.mark.slow
def test_sweep_children_cycle_through_the_grid(runs):
    population = pd.read_parquet(runs / "sweep-s0" / "population.parquet")
    population = population[population["generation"] >= 0]  # without the parent's reference row
    counts = population.groupby(["density", "sigma"]).size()
    assert counts.to_dict() == {(0.1, 0.1): 2, (0.1, 2.0): 2, (1.0, 0.1): 2, (1.0, 2.0): 2}


@pytest.mark.parametrize("extra, field", [
    ({"children": {"density_grid": [0.0]}}, "children.density_grid"),
    ({"children": {"sigma_grid": [-1]}}, "children.sigma_grid"),
    ({"children": {"sigma_grid": ["big"]}}, "children.sigma_grid"),
    ({"children": {"family": "sparse", "density_grid": [0.5]}}, "children.density_grid"),
])
def test_bad_sweep_grids_name_the_field(tmp_path, extra, field):
    config = tiny_dict(tmp_path, extra)
    if "family" in extra["children"]:  # another family's section, without the tiny config's noisy fields
        config["children"] = extra["children"]
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_from_dict(config)


@pytest.mark.slow
def test_selection_comparison_matches_the_chosen_ensemble(runs):
    for name, rule in (("sweep-s0", "topk"), ("plain-s0", "greedy")):
        metrics = json.loads((runs / name / "metrics.json").read_text())
        members = json.loads((runs / name / "members.json").read_text())
        assert set(metrics["selection"]) == {"topk", "greedy"}
        assert metrics["selection"][rule]["candidates"] == [m["candidate"] for m in members]
        assert metrics["selection"][rule]["test"] == pytest.approx(metrics["ensemble"], abs=1e-9)


@pytest.mark.slow
def test_loaded_ensemble_reproduces_the_test_metrics(runs):
    ensemble = load_ensemble(runs / "plain-s0")
    metrics = json.loads((runs / "plain-s0" / "metrics.json").read_text())
    test = load_dataset(ensemble.config.data).test
    # Member by member, the loaded ensemble computes what the run did, to the bit.
    ensemble.vectorise = False
    assert classification_metrics(ensemble.predict_proba(test.x), test.y) == pytest.approx(metrics["ensemble"],
                                                                                             abs=1e-9)
    # Vectorised, the members' matrix products are batched: the same to float rounding.
    ensemble.vectorise = True
    assert classification_metrics(ensemble.predict_proba(test.x), test.y) == pytest.approx(metrics["ensemble"],
                                                                                             abs=1e-6)
    assert len(ensemble.members) == len(metrics["members"])


@pytest.mark.slow
def test_feature_visualisation_drives_its_units_up(runs):
    ensemble = load_ensemble(runs / "plain-s0")
    model, x = ensemble.parent, load_dataset(ensemble.config.data).train.x
    units = pick_units(model, ensemble.input_shape, 4, seed=3)
    assert units == pick_units(model, ensemble.input_shape, 4, seed=3) and len(set(units)) == 4
    start = starting_inputs(model, units, x)
    bounds = (x.min().item(), x.max().item())
    found = maximise_units(model, units, start, bounds, seed=0)
    assert torch.all(unit_activations(model, units, found) > unit_activations(model, units, start))
    assert found.min() >= bounds[0] and found.max() <= bounds[1]
    assert torch.equal(found, maximise_units(model, units, start, bounds, seed=0))
    assert all(p.requires_grad for p in model.parameters())
