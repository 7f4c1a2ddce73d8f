"""Sweeps with Ray Tune: a run as a Tune function trainable, one run directory per trial.

    >>> from ray import tune
    >>> from evo_subens.tune import trainable
    >>> tuner = tune.Tuner(
    ...     trainable("configs/default.yaml", ["workers.executor=local"]),
    ...     param_space={"children.sigma": tune.grid_search([0.25, 0.5]), "seed": tune.randint(0, 1000)},
    ...     tune_config=tune.TuneConfig(metric="search/holdout_ensemble_nll", mode="min"),
    ...     run_config=tune.RunConfig(storage_path="/abs/path/tune", name="sigma"))
    >>> tuner.fit().get_best_result().metrics["ensemble.nll"]   # its test NLL, reported last

A trial's parameters are config fields by their dotted names (``children.sigma``) or as nested dicts
(``{"children": {"sigma": ...}}``), applied over the base config. Each trial writes its run directory
``run`` in its Tune trial folder and reports each generation (the statistics the trackers get:
``search/*``, ``population/fitness_*``, and ``generation``) and, last, every number of its metrics.json
(``ensemble.nll``, ...) with the last generation's statistics. Tune wants its ``metric`` in every report, and
trials are best compared on data no decision saw: a generation statistic on held-back validation data
(``search/holdout_ensemble_nll`` under tuned scoring, ``search/holdout_<fitness>`` under raw scoring), so a
scheduler can stop poor trials early and no trial is chosen on its test metrics. A trial that Tune
retries (``FailureConfig``) resumes its run directory instead of starting again.

Each trial is a Tune actor (1 CPU unless ``tune.with_resources`` says otherwise) running the engine's
driver; with ``workers.executor: ray`` its run starts actors of its own on the same cluster, which need
CPUs of their own, else ``workers.executor: local`` evaluates in the trial's process.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

from .core.config import apply_overrides, config_from_dict, read_config_dict
from .core.runner import resume, run
from .core.tracking import Tracker

RUN_NAME = "run"  # the run directory inside each trial's folder


class TuneReporter(Tracker):
    """Sends a run's statistics to Ray Tune with ``tune.report``: one report per generation, and one with
    the final metrics beside the last generation's statistics."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def generation(self, step: int, values: dict[str, float]) -> None:
        from ray import tune

        self.last = dict(values, generation=step)
        tune.report(self.last)

    def finish(self, metrics: dict[str, float], step: int, artefacts: list[Path]) -> None:
        from ray import tune

        tune.report({**self.last, **metrics, "generation": step})


def _nested(params: dict[str, Any]) -> dict[str, Any]:
    """``{"children.sigma": 0.5}`` -> ``{"children": {"sigma": 0.5}}``; nested dicts merge."""
    nested: dict[str, Any] = {}
    for key, value in params.items():
        *path, last = key.split(".")
        inner = nested
        for name in path:
            inner = inner.setdefault(name, {})
        if isinstance(value, dict):
            inner = inner.setdefault(last, {})
            for sub_key, sub_value in _nested(value).items():
                inner[sub_key] = sub_value
        else:
            inner[last] = value
    return nested


def _merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def trainable(config: dict | str | Path, overrides: list[str] | None = None) -> Callable[[dict], None]:
    """A Tune function trainable running ``config`` (a YAML path or a dict, plus ``key=value`` overrides)
    with each trial's parameters applied. The base is checked now, so a bad config fails before Tune starts
    any trial; data paths are made absolute, since trials run in folders of their own."""
    if isinstance(config, dict):
        base = apply_overrides(copy.deepcopy(config), overrides or [])
    else:
        base = read_config_dict(config, overrides)
    config_from_dict(copy.deepcopy(base))  # checked, defaults left to each trial (its machine's CPUs, say)
    data = base.get("data") or {}
    for name in ("path", "test_path"):
        if data.get(name):
            data[name] = str(Path(data[name]).expanduser().absolute())

    def run_trial(params: dict) -> None:
        from ray import tune

        trial_dir = Path(tune.get_context().get_trial_dir())
        run_dir = trial_dir / RUN_NAME
        reporter = TuneReporter()
        quiet = lambda line: None  # noqa: E731 - Tune shows the reported statistics; results are in run_dir
        if (run_dir / "config.yaml").is_file():  # a retried trial: go on from its checkpoint
            resume(run_dir, progress=quiet, trackers=[reporter])
            return
        trial = _merged(base, _nested(params))
        trial.update(output_dir=str(trial_dir), name=RUN_NAME)
        run(config_from_dict(trial), progress=quiet, trackers=[reporter])

    return run_trial
