"""What a method spends: training epochs and sample-passes, evaluation forward passes.

Every run's ``metrics.json`` carries one record in the same shape, so a table can put accuracy next to
cost for the subnetwork method and for the baselines alike::

    {"train_epochs": 12, "train_sample_passes": 180000, "eval_forward_passes": 250000}

``train_epochs`` sums passes over the training split over every model trained (a bagged model's pass
over its share counts as one epoch); ``train_sample_passes`` counts the samples those passes saw;
``eval_forward_passes`` counts the samples pushed through a network to score candidates (validation)
and to predict the test split with the ensemble. Diagnostics (the parent's per-epoch validation line,
the parent's own test metrics) are not counted.
"""

from __future__ import annotations

from ...core.config import BAGGING_SHARE, RunConfig, candidate_tune_epochs, tune_epochs
from .data import DatasetSplits


def cost_record(train_epochs: int | float, train_sample_passes: int, eval_forward_passes: int) -> dict:
    """The cost record written to ``metrics.json``."""
    return {"train_epochs": train_epochs, "train_sample_passes": int(train_sample_passes),
            "eval_forward_passes": int(eval_forward_passes)}


def subnetwork_cost(cfg: RunConfig, data: DatasetSplits, *, candidates: int, selected: int, members: int,
                    validation: int) -> dict:
    """Cost of a subnetwork run that evaluated ``candidates``, selected (and fine-tuned) ``selected`` of them
    and kept ``members``, with ``validation`` selection samples.

    Greedy selection predicts its pool on the selection split once more, acceptance each selected
    candidate; other diagnostics (the selection rules' comparison, held-back checks, the parent's own
    metrics, temperature scaling) are not counted.
    """
    train_size, parent = len(data.train), (0 if cfg.model.parent_path else cfg.parent.epochs)
    tune = cfg.children.tuning()
    if cfg.search.scoring == "tuned":  # every candidate tuned once, scored once; members not tuned again
        each = candidate_tune_epochs(cfg)
        share = round(BAGGING_SHARE * train_size) if tune is not None and tune.bagging else train_size
        return cost_record(parent + each * candidates, parent * train_size + each * candidates * share,
                           candidates * validation + members * len(data.test))
    epochs_each = tune_epochs(cfg)
    tune_share = round(BAGGING_SHARE * train_size) if tune is not None and tune.bagging else train_size
    epochs = parent + epochs_each * candidates + cfg.finetune.epochs * selected
    passes = (parent + cfg.finetune.epochs * selected) * train_size + epochs_each * candidates * tune_share
    scored = candidates + (selected if cfg.ensemble.acceptance else 0)
    if cfg.ensemble.selection == "greedy":
        scored += min(cfg.ensemble.pool or 4 * cfg.ensemble.size, candidates)
    return cost_record(epochs, passes, scored * validation + members * len(data.test))
