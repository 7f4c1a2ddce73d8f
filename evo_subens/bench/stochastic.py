"""Stochastic Subnetwork Annealing against one-shot pruning at high sparsity, at the same tuning budget.

Fashion-MNIST, LeNet S, for each seed one parent shared by every arm. For each sparsity, ``members``
children with random masks are tuned for the same epochs with the same one-cycle schedule:

- one-shot: the mask fixed from the first step (the ``sparse`` family);
- annealed: the mask sampled from annealed inclusion probabilities (the ``stochastic`` family).

Both arms use the same search seed, so child i of one arm has the same target mask and tuning seed as
child i of the other: only the annealing differs. Prints mean +- standard error over seeds of test
accuracy and NLL of single children (the mean over the run's members) and of the ensemble of all of them.
Finished runs in the output folder with the same config are read back and stopped ones resumed, so an
interrupted benchmark goes on where it stopped.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

from ..core.config import config_from_dict, load_config
from ..errors import RunDirError
from ..core.runner import resume, run

PARENT = {"epochs": 4, "batch_size": 128, "lr": 0.05, "lr_schedule": "cosine", "momentum": 0.9,
          "weight_decay": 5e-4}


def _tune(epochs: int) -> dict:
    return {"epochs": epochs, "batch_size": 128, "lr": 0.05, "lr_schedule": "onecycle", "momentum": 0.9,
            "weight_decay": 5e-4}


def _mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{mean:.4f} +- {se:.4f}"


def _arms(seed: int, sparsity: float, common: dict, anneal: dict, parent_path: str | None,
          output_dir: Path) -> tuple[dict[str, dict], str]:
    """Metrics of both arms at one sparsity: {arm: {"single": ..., "ensemble": ...}} and the parent file."""
    out = {}
    for arm, family in (("one-shot", "sparse"), ("annealed", "stochastic")):
        children = dict(common["children"], family=family, sparsity=sparsity)
        if family == "stochastic":
            children.update(anneal)
        config = dict(common, name=f"{arm}-{sparsity:g}-s{seed}", seed=seed, output_dir=str(output_dir),
                      model=dict(common["model"], parent_path=parent_path), children=children)
        run_dir = output_dir / config["name"]
        metrics = _finished(run_dir, config)
        if metrics is None and (run_dir / "config.yaml").is_file():  # a run stopped part-way goes on
            metrics = resume(run_dir, progress=lambda line: None).metrics
        elif metrics is None:
            metrics = run(config, progress=lambda line: None).metrics
        parent_path = str(run_dir / "parent.pt")  # every arm of a seed shares one parent
        single = {k: statistics.fmean(m[k] for m in metrics["members"]) for k in ("accuracy", "nll")}
        out[arm] = {"single": single, "ensemble": metrics["ensemble"], "parent": metrics["parent"]}
    return out, parent_path


def _finished(run_dir: Path, config: dict) -> dict | None:
    """Metrics of a finished run of exactly ``config`` in ``run_dir``; None when there is none."""
    if not (run_dir / "metrics.json").is_file():
        return None
    if load_config(run_dir / "config.yaml") != config_from_dict(config):
        raise RunDirError(f"{run_dir} holds a finished run of another config; choose another --output-dir")
    return json.loads((run_dir / "metrics.json").read_text())


def stochastic(*, seeds: list[int], sparsities: list[float], members: int = 6, tune_epochs: int = 2,
               num_samples: int | None = 20000, schedule: str = "cosine", start: float = 0.5,
               fraction: float = 0.5, data_root: str | None = None, output_dir: str = "runs/bench-stochastic",
               executor: str = "ray") -> dict[str, list[dict]]:
    """Run both arms for every seed and sparsity and print the table; returns per-row lists of metrics."""
    common = {
        "data": {"name": "fashion-mnist", "path": data_root, "validation_size": 5000, "seed": 0,
                 "num_samples": num_samples},
        "model": {"name": "lenet", "kwargs": {"size": "S"}}, "parent": PARENT,
        "children": {"mask": "random", "structure": "connection", "scope": "global", "tune": _tune(tune_epochs)},
        "search": {"population": members, "generations": 1, "elites": 1, "fitness": "nll"},
        # Both arms differ only in how children are tuned: no further fine-tuning, every child ensembled.
        "finetune": {"epochs": 0}, "ensemble": {"size": members, "acceptance": False, "holdout": 0.0},
        "workers": {"executor": executor}}
    anneal = {"anneal_schedule": schedule, "anneal_start": start, "anneal_fraction": fraction}
    table: dict[str, list[dict]] = defaultdict(list)
    started = time.perf_counter()
    for seed in seeds:
        parent_path = None
        for sparsity in sparsities:
            arms, parent_path = _arms(seed, sparsity, common, anneal, parent_path, Path(output_dir))
            if sparsity == sparsities[0]:
                table["parent (dense)"].append(arms["one-shot"]["parent"])
            for arm, metrics in arms.items():
                table[f"{sparsity:.0%} {arm} single"].append(metrics["single"])
                table[f"{sparsity:.0%} {arm} ensemble ({members})"].append(metrics["ensemble"])
            print(f"seed {seed} sparsity {sparsity:g}: " + ", ".join(
                f"{arm} single {m['single']['accuracy']:.4f} ens {m['ensemble']['accuracy']:.4f}"
                for arm, m in arms.items()) + f"  ({time.perf_counter() - started:.0f}s)", flush=True)
    print(f"\nFashion-MNIST, LeNet S, pool {num_samples or 'all'} (5,000 validation), parent {PARENT['epochs']} "
          f"epochs, {members} random-mask children tuned {tune_epochs} epochs (one-cycle); annealed: "
          f"{schedule}, start {start:g}, over {fraction:.0%} of tuning; seeds {seeds}, mean +- standard error")
    print(f"{'method':<32}{'test accuracy':>20}{'test nll':>20}")
    for name, rows in table.items():
        print(f"{name:<32}" + "".join(f"{_mean_se([r[k] for r in rows]):>20}" for k in ("accuracy", "nll")))
    print(f"wall time {time.perf_counter() - started:.0f}s")
    return dict(table)
