"""The scikit-learn estimator: scikit-learn's own estimator checks, and the tools users drop it into."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_wine
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from evo_subens.sklearn import SubnetworkEnsembleClassifier

# A small budget: the checks fit dozens of times on tens of samples.
CHEAP = {"model": {"kwargs": {"hidden": [16]}}, "parent": {"epochs": 30, "batch_size": 16, "lr": 0.05},
         "search": {"population": 2, "generations": 1, "scoring": "raw", "elites": 1, "patience": 0},
         "ensemble": {"size": 2, "acceptance": False}, "finetune": {"epochs": 0}}


@pytest.mark.slow
@parametrize_with_checks([SubnetworkEnsembleClassifier(**CHEAP)])
def test_scikit_learn_estimator_checks(estimator, check) -> None:
    check(estimator)


@pytest.fixture(scope="module")
def wine() -> tuple[np.ndarray, np.ndarray]:
    """A CSV-sized table: 178 wines, 13 measurements, 3 cultivars named as strings."""
    x, y = load_wine(return_X_y=True)
    return x, np.array(["barolo", "grignolino", "barbera"])[y]


@pytest.mark.slow
def test_grid_search_over_sigma_in_a_pipeline(wine) -> None:
    """GridSearchCV tunes children.sigma (the grid key children__sigma) of the estimator inside a Pipeline,
    scored by cross-validated log loss; the refitted best predicts the cultivars' names and beats chance by
    far on rows it never saw."""
    x, y = wine
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    pipeline = Pipeline([("scale", StandardScaler()), ("ensemble", SubnetworkEnsembleClassifier(**CHEAP))])
    grid = GridSearchCV(pipeline, {"ensemble__children__sigma": [0.1, 0.5]}, cv=3, scoring="neg_log_loss")
    grid.fit(x_train, y_train)
    assert set(grid.cv_results_["param_ensemble__children__sigma"]) == {0.1, 0.5}
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()
    best = grid.best_estimator_.named_steps["ensemble"]
    assert best.children == {"sigma": grid.best_params_["ensemble__children__sigma"]}
    assert "children" not in CHEAP  # the grid set the field on a copy, not on the dict the estimator was given
    assert set(grid.predict(x_test)) <= set(y) and list(best.classes_) == sorted(set(y))
    assert grid.score(x_test, y_test) > -0.5  # log loss well under chance's log(3) = 1.10
    np.testing.assert_allclose(grid.predict_proba(x_test).sum(axis=1), 1.0, rtol=1e-12)  # as log_loss checks
    cross = cross_val_score(SubnetworkEnsembleClassifier(**CHEAP), x_train, y_train, cv=3)
    assert cross.min() > 0.8


@pytest.mark.slow
@pytest.mark.ray
def test_fit_on_ray_actors_equals_fit_in_process(ray_session, wine, tmp_path) -> None:
    """workers={"executor": "ray"} evaluates the children in Ray actors; the fitted ensemble is the one an
    in-process fit gives, and the run directory is kept where output_dir says."""
    x, y = wine
    local = SubnetworkEnsembleClassifier(**CHEAP).fit(x, y)
    remote = SubnetworkEnsembleClassifier(**CHEAP, output_dir=str(tmp_path)).set_params(workers__executor="ray",
                                                                                        workers__num_actors=2)
    remote.fit(x, y)
    np.testing.assert_array_equal(remote.predict_proba(x), local.predict_proba(x))
    assert local.run_dir_ is None and remote.run_dir_.parent == tmp_path
    assert (remote.run_dir_ / "population.parquet").is_file()
    assert (remote.get_params()["workers"] == {"executor": "ray", "num_actors": 2})


def test_a_parent_that_cannot_learn_warns_and_fits() -> None:
    """Labels unrelated to the inputs: scikit-learn fits anything, so the run goes on past its parent check
    and says so as a warning, and a fitted estimator still predicts known labels."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)), rng.integers(0, 2, size=60)
    with pytest.warns(UserWarning, match="the parent did not learn"):
        fitted = SubnetworkEnsembleClassifier(**CHEAP).fit(x, y)
    assert set(fitted.predict(x)) <= {0, 1}


def test_bad_parameters_are_value_errors() -> None:
    """A section that is not a dict, or a field the config does not have, fails fit with a ValueError that
    names it (what scikit-learn's search tools catch and report)."""
    x, y = np.eye(6), np.arange(6) % 2
    with pytest.raises(ValueError, match=r"children=\.\.\.\): expected a dict"):
        SubnetworkEnsembleClassifier(children=0.5).fit(x, y)
    with pytest.raises(ValueError, match="children.sigmaa"):
        SubnetworkEnsembleClassifier(children={"sigmaa": 0.5}).fit(x, y)
    with pytest.raises(ValueError, match="tracking writes into the run directory"):
        SubnetworkEnsembleClassifier(tracking={"tensorboard": True}).fit(x, y)
    with pytest.raises(ValueError, match="'colour' is not a config section"):
        SubnetworkEnsembleClassifier().set_params(colour__red=1)
