"""A scikit-learn classifier whose ``fit`` runs the engine: a parent trained on ``X, y``, its children
searched and the best joined into an ensemble, which ``predict_proba`` averages.

    >>> from evo_subens.sklearn import SubnetworkEnsembleClassifier
    >>> from sklearn.model_selection import GridSearchCV, cross_val_score
    >>> clf = SubnetworkEnsembleClassifier(model={"name": "mlp", "kwargs": {"hidden": [64]}})
    >>> cross_val_score(clf, X, y, cv=5, scoring="neg_log_loss")
    >>> GridSearchCV(clf, {"children__sigma": [0.25, 0.5]}, cv=3).fit(X, y).best_params_

Each section of a run's config (``data``, ``model``, ``parent``, ``children``, ``search``, ``finetune``,
``ensemble``, ``workers``, ``tracking``) is a constructor parameter holding that section's fields as a
dict, exactly as in a YAML config; fields left out keep the engine's defaults. ``section__field`` names
one field, as scikit-learn names nested parameters, in ``set_params`` and in grids (``children__sigma``,
``model__kwargs__hidden``). The model defaults to the registry's ``mlp`` and the evaluation to this process
(``workers={"executor": "ray"}`` evaluates in Ray actors, on a cluster with ``workers.address``).
``tracking`` logs each fit as a run of its own; it needs ``output_dir`` (or ``tracking.mlflow_uri`` for
MLflow), since the run directory is otherwise temporary.

``fit`` trains on all of ``X``: the engine's validation split (``data.validation_size``) is carved from it
for the search, and no test split is held out (the run's own test metrics are on ``X``; score on data of
your own). Each fit writes a run directory; with ``output_dir`` unset it goes to a temporary folder that is
removed once the ensemble is loaded, else it stays, named ``run_dir_``, for ``evo-subens report``.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .errors import UserError

SECTIONS = ("data", "model", "parent", "children", "search", "finetune", "ensemble", "workers", "tracking")


class SubnetworkEnsembleClassifier(ClassifierMixin, BaseEstimator):
    """An ensemble of subnetworks of one trained parent, as a scikit-learn classifier.

    Parameters: one dict (or None) per config section (see the module docstring), ``seed`` (the run's
    seed: a fit is a function of the parameters, the data and the seed), ``output_dir`` (keep each fit's run
    directory there; None: a temporary one) and ``verbose`` (print the run's progress lines).

    Attributes after ``fit``: ``classes_``, ``n_features_in_`` (and ``feature_names_in_`` for a
    DataFrame), ``ensemble_`` (the :class:`~evo_subens.ensemble.Ensemble` module, an ``nn.Module`` that
    ``evo_subens.export_ensemble`` ships), ``metrics_`` (the run's metrics.json) and ``run_dir_`` (None
    when the run directory was temporary).
    """

    def __init__(self, data: dict | None = None, model: dict | None = None, parent: dict | None = None,
                 children: dict | None = None, search: dict | None = None, finetune: dict | None = None,
                 ensemble: dict | None = None, workers: dict | None = None, tracking: dict | None = None,
                 seed: int = 0, output_dir: str | None = None, verbose: bool = False):
        self.data = data
        self.model = model
        self.parent = parent
        self.children = children
        self.search = search
        self.finetune = finetune
        self.ensemble = ensemble
        self.workers = workers
        self.tracking = tracking
        self.seed = seed
        self.output_dir = output_dir
        self.verbose = verbose

    # --- parameters: config sections and their fields -------------------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's parameters; with ``deep``, also each section's fields as ``section__field``."""
        params = super().get_params(deep=False)
        if deep:
            for section in SECTIONS:
                if isinstance(params[section], dict):
                    params.update(_flatten(params[section], section))
        return params

    def set_params(self, **params: Any) -> SubnetworkEnsembleClassifier:
        """Set parameters; ``section__field`` (``children__sigma``, ``model__kwargs__hidden``) sets one field
        of a section's dict (a new dict: the one passed to the constructor is left as it was)."""
        nested = {key: value for key, value in params.items() if "__" in key}
        super().set_params(**{key: value for key, value in params.items() if "__" not in key})
        for key, value in nested.items():
            section, *path = key.split("__")
            if section not in SECTIONS:
                raise ValueError(f"Invalid parameter {key!r} for estimator {type(self).__name__}: "
                                 f"{section!r} is not a config section ({', '.join(SECTIONS)})")
            fields = getattr(self, section)
            fields = copy.deepcopy(fields) if isinstance(fields, dict) else {}
            inner = fields
            for name in path[:-1]:
                inner = inner.setdefault(name, {})
            inner[path[-1]] = value
            setattr(self, section, fields)
        return self

    # --- fit and predict ---------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> SubnetworkEnsembleClassifier:
        """Train a parent on ``X, y``, search its children and keep the ensemble; returns self."""
        from . import load_ensemble, run  # the engine: torch, Ray and EvoTorch load on first fit

        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, indices = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes; y holds "
                             f"{len(self.classes_)} class")
        with tempfile.TemporaryDirectory(prefix="evo-subens-fit-") as scratch:
            keep = self.output_dir is not None
            config = self._config(Path(self.output_dir) if keep else Path(scratch))
            progress = _Progress(self.verbose)
            try:
                result = run(config, data=(X, indices, X, indices), progress=progress)
            except UserError as exc:  # scikit-learn's callers expect bad input as a ValueError
                raise ValueError(str(exc)) from exc
            self.ensemble_ = load_ensemble(result.run_dir)
            self.metrics_ = result.metrics
            self.run_dir_ = result.run_dir if keep else None
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Mean member probabilities, shape (n_samples, n_classes), columns in ``classes_`` order."""
        check_is_fitted(self, "ensemble_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        probs = self.ensemble_.predict_proba(X).astype(np.float64)
        # The module's float32 rows sum to 1 within ~1e-7; scikit-learn's log loss wants float64's 1.
        return probs / probs.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        """The class label of highest mean probability for each sample."""
        check_is_fitted(self, "ensemble_")
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def _config(self, output_dir: Path) -> dict:
        """The run's config: the sections as given, over this estimator's defaults."""
        for section in SECTIONS:
            if not isinstance(getattr(self, section), (dict, type(None))):
                raise ValueError(f"{type(self).__name__}({section}=...): expected a dict of the config's "
                                 f"{section} fields or None, got {getattr(self, section)!r}")
        config = {section: copy.deepcopy(getattr(self, section) or {}) for section in SECTIONS}
        tracking = config["tracking"]
        if self.output_dir is None and (tracking.get("tensorboard") or
                                        (tracking.get("mlflow") and not tracking.get("mlflow_uri"))):
            raise ValueError(f"{type(self).__name__}: tracking writes into the run directory (TensorBoard) or "
                             f"beside it (MLflow's default store), which is temporary without output_dir: set "
                             f"output_dir, or tracking.mlflow_uri for MLflow")
        config["model"] = {"name": "mlp", **config["model"]}
        config["workers"] = {"executor": "local", **config["workers"]}
        config["parent"] = {"check_learned": False, **config["parent"]}
        return {**config, "seed": self.seed, "output_dir": str(output_dir), "name": None}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False  # a fit is a function of parameters, data and seed
        return tags


class _Progress:
    """The run's progress lines: printed when ``verbose``; its warnings (a parent that did not learn, tied
    candidates) also raised as Python warnings, which scikit-learn's tools collect."""

    def __init__(self, verbose: bool):
        self.verbose = verbose

    def __call__(self, line: str) -> None:
        if self.verbose:
            print(line, flush=True)
        if "] warning: " in line:
            warnings.warn(line.split("] warning: ", 1)[1], UserWarning, stacklevel=2)


def _flatten(fields: dict, prefix: str) -> dict[str, Any]:
    """``{"kwargs": {"hidden": [8]}}`` under ``model`` -> ``{"model__kwargs__hidden": [8]}``."""
    flat = {}
    for key, value in fields.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}__{key}"))
        else:
            flat[f"{prefix}__{key}"] = value
    return flat
