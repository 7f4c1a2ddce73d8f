"""Prune and Tune ensembles against matched-budget baselines, in the shape of PAT Table 1.

Fashion-MNIST, a LeNet-style network, 16 epochs of training budget per method, several seeds:

- PAT random / anti-random: a parent trained 8 epochs, then 8 children pruned to 50% sparsity and
  tuned 1 epoch each (Adam 1e-3, the paper's small-budget recipe), ensembled (the engine's own runs,
  children tuned in Ray actors);
- single: one model trained 16 epochs;
- bagging: 8 models trained 2 epochs each on their own random 90% of the training split;
- dropout: one model with 50% dropout in the fully connected head, 16 epochs.

Prints mean +- standard error over seeds of test accuracy, NLL and ECE, with each method's cost in
training epochs (passes over the training split, summed over its models).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig, ModelConfig, TrainConfig
from ..data import Split, load_dataset
from ..metrics import classification_metrics
from ..models import build_model
from ..runner import run
from ..training import predict_probs, train

PARENT = {"epochs": 8, "batch_size": 128, "lr": 0.05, "lr_schedule": "cosine", "momentum": 0.9,
          "weight_decay": 5e-4}
# The paper's small-budget recipe for children: 1 epoch of Adam at 1e-3.
CHILD_TUNE = {"epochs": 1, "optimizer": "adam", "lr": 1e-3, "lr_schedule": "constant", "weight_decay": 0.0}


def _train_and_predict(model_cfg: ModelConfig, data, train_cfg: TrainConfig, seed: int,
                       subset: np.ndarray | None = None) -> torch.Tensor:
    torch.manual_seed(seed)
    model = build_model(model_cfg, data.input_shape, data.num_classes)
    split = data.train
    if subset is not None:
        index = torch.from_numpy(subset)
        split = Split(split.x[index], split.y[index])
    train(model, split, train_cfg, seed=seed)
    return predict_probs(model, data.test.x)


def _baselines(data, seed: int, budget: int, members: int) -> dict[str, tuple[dict, float]]:
    lenet = ModelConfig(name="lenet")
    full = TrainConfig(**dict(PARENT, epochs=budget))
    single = _train_and_predict(lenet, data, full, seed)
    rng = np.random.default_rng([seed, 3])
    n = len(data.train)
    bag_cfg = TrainConfig(**dict(PARENT, epochs=budget // members))
    bags = [_train_and_predict(lenet, data, bag_cfg, seed * 100 + i,
                               np.sort(rng.choice(n, round(0.9 * n), replace=False))) for i in range(members)]
    dropout = _train_and_predict(ModelConfig(name="lenet", kwargs={"dropout": 0.5}), data, full, seed)
    y = data.test.y
    return {"single (16 ep)": (classification_metrics(single, y), budget),
            f"bagging ({members} x {budget // members} ep, 90%)": (
                classification_metrics(torch.stack(bags).mean(0), y), 0.9 * budget),
            "dropout 0.5 (16 ep)": (classification_metrics(dropout, y), budget)}


def _pat_runs(seed: int, data_cfg: dict, output_dir: Path, members: int, workers: dict) -> dict[str, tuple]:
    results = {}
    parent_path = None
    for mask in ("random", "antirandom"):
        config = {
            "name": f"pat-{mask}-s{seed}", "seed": seed, "output_dir": str(output_dir), "data": data_cfg,
            "model": {"name": "lenet", "parent_path": parent_path}, "parent": PARENT,
            "children": {"family": "sparse", "mask": mask, "sparsity": 0.5, "tune": CHILD_TUNE},
            "search": {"population": members, "generations": 1, "elites": 1, "fitness": "nll"},
            "ensemble": {"size": members}, "workers": workers}
        result = run(config, progress=lambda line: None)
        parent_path = str(result.run_dir / "parent.pt")  # both arms share one parent per seed
        results[f"PAT {mask} ({members} x 1 ep @50%)"] = (result.metrics["ensemble"], PARENT["epochs"] + members)
        results.setdefault("parent (8 ep)", (result.metrics["parent"], PARENT["epochs"]))
    return results


def _mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{mean:.4f} +- {se:.4f}"


def prune_tune(*, seeds: list[int], data_root: str | None = None, output_dir: str = "runs/bench-prune-tune",
               members: int = 8, executor: str = "ray") -> dict[str, list[dict]]:
    """Run every method for every seed and print the table; returns per-method lists of metrics."""
    data_cfg = {"name": "fashion-mnist", "root": data_root, "validation_size": 5000, "seed": 0}
    data = load_dataset(DataConfig(**data_cfg))
    table: dict[str, list[dict]] = defaultdict(list)
    costs: dict[str, float] = {}
    for seed in seeds:
        methods = _pat_runs(seed, data_cfg, Path(output_dir), members, {"executor": executor})
        methods.update(_baselines(data, seed, budget=2 * PARENT["epochs"], members=members))
        for name, (metrics, cost) in methods.items():
            table[name].append(metrics)
            costs[name] = cost
        print(f"seed {seed}: " + ", ".join(f"{k} acc {m['accuracy']:.4f}" for k, (m, _) in methods.items()),
              flush=True)
    print(f"\nFashion-MNIST, LeNet, {len(data.train):,} train / {len(data.test):,} test, seeds {seeds}, "
          f"mean +- standard error")
    print(f"{'method':<34}{'accuracy':>20}{'nll':>20}{'ece':>20}{'train epochs':>14}")
    for name, rows in table.items():
        print(f"{name:<34}" + "".join(f"{_mean_se([r[k] for r in rows]):>20}" for k in ("accuracy", "nll", "ece"))
              + f"{costs[name]:>14g}")
    return dict(table)
