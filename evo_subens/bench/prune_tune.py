"""Prune and Tune ensembles against matched-budget baselines, in the shape of PAT Table 1.

Fashion-MNIST, a LeNet-style network, 16 epochs of training budget per method, several seeds:

- PAT random / anti-random: a parent trained 8 epochs, then 8 children pruned to 50% sparsity and
  tuned 1 epoch each (Adam 1e-3, the paper's small-budget recipe), ensembled (the engine's own runs,
  children tuned in Ray actors);
- single: one model trained 16 epochs;
- bagging: 8 models trained 2 epochs each on their own random 90% of the training split;
- dropout: one model with 50% dropout in the fully connected head, 16 epochs.

Prints mean +- standard error over seeds of test accuracy, NLL and ECE, with each method's cost in
training epochs (passes over the training split, summed over its models) and training sample-passes.
The baselines are :mod:`evo_subens.tasks.classification.baselines` (``mc_dropout`` with ``mc_samples: 0`` for dropout).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..tasks.classification.baselines import BASELINES
from ..core.config import DataConfig, config_from_dict
from ..tasks.classification.data import load_dataset
from ..tasks.classification.metrics import classification_metrics
from ..core.runner import run
from .quality import mean_se

PARENT = {"epochs": 8, "batch_size": 128, "lr": 0.05, "lr_schedule": "cosine", "momentum": 0.9,
          "weight_decay": 5e-4}
# The paper's small-budget recipe for children: 1 epoch of Adam at 1e-3.
CHILD_TUNE = {"epochs": 1, "optimizer": "adam", "lr": 1e-3, "lr_schedule": "constant", "weight_decay": 0.0}


def _baselines(data, data_cfg: dict, seed: int, budget: int, members: int) -> dict[str, tuple[dict, dict]]:
    """The matched-budget baselines of :mod:`evo_subens.tasks.classification.baselines`, trained with the parent's recipe."""
    methods = {
        f"single ({budget} ep)": ("single", {}),
        f"bagging ({members} x {budget // members} ep, 90%)": ("bagging", {"members": members, "bagging_share": 0.9}),
        # PAT's dropout baseline predicts with dropout off: mc_samples 0.
        f"dropout 0.5 ({budget} ep)": ("mc_dropout", {"dropout": 0.5, "mc_samples": 0}),
    }
    results = {}
    for name, (method, baseline) in methods.items():
        cfg = config_from_dict({"seed": seed, "data": data_cfg, "model": {"name": "lenet"}, "parent": PARENT,
                                "method": method, "baseline": dict(baseline, budget_epochs=budget)})
        output = BASELINES[method](cfg, data, seed)
        probs = sum(output.test_probs) / len(output.test_probs)
        results[name] = (classification_metrics(probs, data.test.y), output.cost)
    return results


def _pat_runs(seed: int, data_cfg: dict, output_dir: Path, members: int, workers: dict,
             train_size: int) -> dict[str, tuple[dict, dict]]:
    parent_cost = {"train_epochs": PARENT["epochs"], "train_sample_passes": PARENT["epochs"] * train_size}
    results = {}
    parent_path = None
    for mask in ("random", "antirandom"):
        config = {
            "name": f"pat-{mask}-s{seed}", "seed": seed, "output_dir": str(output_dir), "data": data_cfg,
            "model": {"name": "lenet", "parent_path": parent_path}, "parent": PARENT,
            "children": {"family": "sparse", "mask": mask, "sparsity": 0.5, "tune": CHILD_TUNE},
            "search": {"population": members, "generations": 1, "elites": 1, "fitness": "nll"},
            # The paper's recipe: every tuned child in the ensemble, no further fine-tuning or held-back part.
            "finetune": {"epochs": 0}, "ensemble": {"size": members, "acceptance": False, "holdout": 0.0},
            "workers": workers}
        result = run(config, progress=lambda line: None)
        parent_path = str(result.run_dir / "parent.pt")  # both arms share one parent per seed
        cost = dict(result.metrics["cost"])
        if mask != "random":  # the shared parent is loaded, not trained again: charge it here too
            cost = {k: cost[k] + parent_cost[k] for k in parent_cost}
        results[f"PAT {mask} ({members} x 1 ep @50%)"] = (result.metrics["ensemble"], cost)
        results.setdefault(f"parent ({PARENT['epochs']} ep)", (result.metrics["parent"], parent_cost))
    return results


def prune_tune(*, seeds: list[int], data_root: str | None = None, output_dir: str = "runs/bench-prune-tune",
               members: int = 8, executor: str = "ray") -> dict[str, list[dict]]:
    """Run every method for every seed and print the table; returns per-method lists of metrics."""
    data_cfg = {"name": "fashion-mnist", "path": data_root, "validation_size": 5000, "seed": 0}
    data = load_dataset(DataConfig(**data_cfg))
    table: dict[str, list[dict]] = defaultdict(list)
    costs: dict[str, dict] = {}
    for seed in seeds:
        methods = _pat_runs(seed, data_cfg, Path(output_dir), members, {"executor": executor}, len(data.train))
        methods.update(_baselines(data, data_cfg, seed, budget=2 * PARENT["epochs"], members=members))
        for name, (metrics, cost) in methods.items():
            table[name].append(metrics)
            costs[name] = cost
        print(f"seed {seed}: " + ", ".join(f"{k} acc {m['accuracy']:.4f}" for k, (m, _) in methods.items()),
              flush=True)
    print(f"\nFashion-MNIST, LeNet, {len(data.train):,} train / {len(data.test):,} test, seeds {seeds}, "
          f"mean +- standard error")
    print(f"{'method':<34}{'accuracy':>20}{'nll':>20}{'ece':>20}{'train epochs':>14}{'train passes':>14}")
    for name, rows in table.items():
        print(f"{name:<34}" + "".join(f"{mean_se([r[k] for r in rows]):>20}" for k in ("accuracy", "nll", "ece"))
              + f"{costs[name]['train_epochs']:>14g}{costs[name]['train_sample_passes']:>14,}")
    return dict(table)
