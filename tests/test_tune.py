"""Ray Tune sweeps: each trial a run directory of its own, reporting its generations and final metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from evo_subens.errors import ConfigError

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_two_trial_sweep_over_sigma(ray_session, tmp_path: Path) -> None:
    """A grid of two children.sigma values: two trials, each with its run directory in its Tune folder
    holding that sigma; Tune gets one report per generation and a last one adding metrics.json's numbers;
    the best trial is chosen on held-back validation data (search/holdout_nll), never on test data."""
    from ray import tune

    from evo_subens.tune import trainable

    tuner = tune.Tuner(trainable(TINY),
                       param_space={"children.sigma": tune.grid_search([0.2, 0.6])},
                       tune_config=tune.TuneConfig(metric="search/holdout_nll", mode="min"),
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="sigma", verbose=0))
    results = tuner.fit()
    assert len(results) == 2 and not results.errors
    sigmas = set()
    for result in results:
        run_dir = Path(result.path) / "run"
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert recorded["children"]["sigma"] == result.config["children.sigma"]
        sigmas.add(recorded["children"]["sigma"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert result.metrics["ensemble.nll"] == pytest.approx(metrics["ensemble"]["nll"])
        reports = result.metrics_dataframe
        assert list(reports["generation"]) == [0, 1, 1]  # the two generations, then the final metrics
        assert list(reports["search/val_accuracy"].iloc[:2]) == [g["val_accuracy"]
                                                                  for g in metrics["search"]["generations"]]
    assert sigmas == {0.2, 0.6}
    best = results.get_best_result()
    assert best.metrics["search/holdout_nll"] == min(result.metrics["search/holdout_nll"] for result in results)


def test_a_bad_base_config_fails_before_any_trial() -> None:
    from evo_subens.tune import trainable

    with pytest.raises(ConfigError, match="search.populaton"):
        trainable(TINY, ["search.populaton=4"])
