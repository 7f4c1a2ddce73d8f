"""The validation fitness of each generation's candidates, for every task's report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ..core.rundir import atomic_write
from ..tasks import task_metrics


def fitness_plot(population: pd.DataFrame, fitness: str, parent: float | None, path: Path,
                 task: str = "classification") -> None:
    """Best, median and worst validation ``fitness`` of each generation (a metric of ``task``)."""
    metric = next(m for m in task_metrics(task) if m.name == fitness)
    lower_is_better = not metric.higher_is_better
    column = f"val_{fitness}"
    grouped = population.groupby("generation")[column]
    best = grouped.min() if lower_is_better else grouped.max()
    worst = grouped.max() if lower_is_better else grouped.min()
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.subplots()
    axes.plot(best.index, best.values, "o-", label="best")
    axes.plot(grouped.median().index, grouped.median().values, "s-", label="median")
    axes.plot(worst.index, worst.values, "v-", label="worst")
    if parent is not None:
        axes.axhline(parent, color="black", linestyle="--", linewidth=1, label="parent")
    label = {"nll": "NLL"}.get(fitness, fitness)
    axes.set_title(f"Validation {label} per generation (lower is better)" if lower_is_better
                   else f"Validation {label} per generation")
    axes.set_xlabel("generation")
    axes.set_ylabel(f"validation {label}")
    axes.set_xticks(list(best.index))
    axes.legend()
    save_figure(figure, path)


def save_figure(figure: Figure, path: Path) -> None:
    """Write ``figure`` as a PNG, atomically."""
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, dpi=110, format="png"))
