"""The validation fitness of each generation's candidates, and how far the search went, for every task's report.

The parent's line is on the rows the candidates are scored on, so a child on the wrong side of it is worse
than its parent on exactly the data the choice was made on. It is the population log's reference row
(generation -1: the parent scored like every candidate); where candidates are fine-tuned before they are
scored, that row is the parent fine-tuned the same way, drawn as a second line beside the parent itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ..core.progress import generation_span
from ..core.rundir import atomic_write
from ..tasks import task_metrics

# The axis shows best, median and the parent's line at no less than this share of its height: a worst
# candidate further out is drawn at the edge with its value written beside it.
CORE_SHARE = 0.5


def search_extent(population: pd.DataFrame | None, planned: int, search: dict | None,
                  patience: int | None = None) -> str:
    """``8 candidates x 2 of 4 generations (stopped early after generation 1: ...)``: what ran, from the
    population log (else ``metrics.json``'s ``search`` block), against the ``planned`` search.generations."""
    search = search or {}
    counts = None
    if population is not None:
        counts = population[population["generation"] >= 0].groupby("generation").size()
    ran = len(counts) if counts is not None else search.get("generations_run", planned)
    if counts is not None and len(counts) and counts.nunique() > 1:
        size = f"{int(counts.sum())} candidates over {ran}"
    else:
        size = f"{int(counts.iloc[0]) if counts is not None and len(counts) else '?'} candidates x {ran}"
    text = f"{size} of {planned} planned generations" if ran != planned else f"{size} generations"
    if ran < planned:
        if search.get("stopped_early"):
            why = (f"{patience} generation(s) without a better best candidate" if patience
                   else "no better best candidate")
            text += (f" (stopped early after generation {ran - 1}: {why}, search.patience; "
                     f"{generation_span(ran, planned - 1)} not run)")
        else:
            text += f" ({generation_span(ran, planned - 1)} not run)"
    return text


def axis_limits(core: list[float], worst: list[float], lower_is_better: bool) -> tuple[float, float, list[int]]:
    """The y-limits of the fitness plot and the indices of ``worst`` values outside them.

    ``core`` (best, median, parent) always fits; a ``worst`` value fits unless it would squeeze the core
    below :data:`CORE_SHARE` of the axis height."""
    core = [v for v in core if math.isfinite(v)]
    finite = [v for v in worst if math.isfinite(v)]
    if not core:
        core = finite or [0.0]
    low, high = min(core), max(core)
    span = high - low or max(abs(high) * 0.05, 1e-3)
    reach = span * (1 - CORE_SHARE) / CORE_SHARE  # the room beyond the core that worst values may take
    if lower_is_better:
        bound = high + reach
        clipped = [i for i, v in enumerate(worst) if math.isfinite(v) and v > bound]
        top = max([high, *[v for v in finite if v <= bound]])
        pad = 0.06 * (top - low or span)
        return low - pad, (bound if clipped else top + pad), clipped
    bound = low - reach
    clipped = [i for i, v in enumerate(worst) if math.isfinite(v) and v < bound]
    bottom = min([low, *[v for v in finite if v >= bound]])
    pad = 0.06 * (high - bottom or span)
    return (bound if clipped else bottom - pad), high + pad, clipped


@dataclass(frozen=True)
class FitnessLines:
    """What the fitness plot draws: per generation (0-based, candidates only) the best, median and worst
    fitness; the parent's value on the same rows; under tuned scoring the parent fine-tuned like a candidate."""

    best: pd.Series
    median: pd.Series
    worst: pd.Series
    parent: float | None
    tuned_parent: float | None
    lower_is_better: bool


def fitness_lines(population: pd.DataFrame, fitness: str, parent: float | None, task: str = "classification",
                  tuned_reference: bool = False) -> FitnessLines:
    """The lines of :func:`fitness_plot` (its arguments of the same names)."""
    metric = next(m for m in task_metrics(task) if m.name == fitness)
    lower_is_better = not metric.higher_is_better
    column = f"val_{fitness}"
    reference = population.loc[population["generation"] < 0, column]
    tuned = float(reference.iloc[0]) if len(reference) and tuned_reference else None
    if len(reference) and not tuned_reference:
        parent = float(reference.iloc[0])
    grouped = population[population["generation"] >= 0].groupby("generation")[column]

    def finite(value: float | None) -> float | None:
        return value if value is not None and math.isfinite(value) else None

    return FitnessLines(best=grouped.min() if lower_is_better else grouped.max(), median=grouped.median(),
                        worst=grouped.max() if lower_is_better else grouped.min(), parent=finite(parent),
                        tuned_parent=finite(tuned), lower_is_better=lower_is_better)


def fitness_plot(population: pd.DataFrame, fitness: str, parent: float | None, path: Path,
                 task: str = "classification", *, planned: int | None = None, stopped_early: bool = False,
                 rows: str | None = None, tuned_reference: bool = False) -> list[str]:
    """Best, median and worst validation ``fitness`` of each generation (a metric of ``task``), the parent's
    line, and the planned generations that did not run; returns sentences on what the figure cannot show.

    ``population`` is the whole log. Its generation -1 row is the parent's score on the candidates' rows;
    with ``tuned_reference`` that row is the parent fine-tuned like a candidate, and ``parent`` (the parent
    itself on the same rows) is the parent's line. Otherwise ``parent`` is used only where the log has no
    reference row. ``rows`` names the data the fitness is measured on (the y-axis label)."""
    lines = fitness_lines(population, fitness, parent, task, tuned_reference)
    best, median, worst, lower_is_better = lines.best, lines.median, lines.worst, lines.lower_is_better
    parent, tuned = lines.parent, lines.tuned_parent
    parent_values = [parent] if parent is not None else []
    tuned_values = [tuned] if tuned is not None else []
    low, high, clipped = axis_limits([*best.values, *median.values, *parent_values, *tuned_values],
                                     list(worst.values), lower_is_better)

    figure = Figure(figsize=(8.0, 4.0))
    axes = figure.subplots()
    axes.plot(best.index, best.values, "o-", label="best")
    axes.plot(median.index, median.values, "s-", label="median")
    # A clipped worst value leaves a gap in its line and an arrowhead at the edge with the value beside it.
    edge = high if lower_is_better else low
    shown = worst.where(~worst.index.isin(worst.index[clipped]))
    (line,) = axes.plot(shown.index, shown.values, "v-", label="worst")
    for i in clipped:
        generation, value = worst.index[i], worst.values[i]
        axes.plot([generation], [edge], "^" if lower_is_better else "v", color=line.get_color(), markersize=9,
                  clip_on=False)
        axes.annotate(f"{value:.3g}", (generation, edge), textcoords="offset points", ha="center",
                      xytext=(0, -16 if lower_is_better else 10), fontsize=8, color=line.get_color())
    if parent_values:
        axes.axhline(parent, color="black", linestyle="--", linewidth=1, label="parent (same rows)")
    if tuned_values:
        axes.axhline(tuned, color="grey", linestyle=":", linewidth=1.2, label="parent fine-tuned like a candidate")
    ran = int(best.index.max()) + 1 if len(best) else 0  # generations 0..ran-1 ran
    total = max(planned or 0, ran)
    notes = []
    if total > ran:
        axes.axvspan(ran - 0.5, total - 0.5, color="grey", alpha=0.15, linewidth=0)
        word = "stopped early" if stopped_early else "not run"
        axes.text((ran + total - 1) / 2, 0.5, f"{word}:\n{generation_span(ran, total - 1)}\nnot run", ha="center",
                  va="center", transform=axes.get_xaxis_transform(), fontsize=9, color="dimgrey",
                  bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        notes.append(f"The shaded {generation_span(ran, total - 1)} did not run"
                     + (" (the search stopped early, search.patience)." if stopped_early else "."))
    axes.set_xlim(-0.5, max(total, 1) - 0.5)
    axes.set_ylim(low, high)
    label = {"nll": "NLL"}.get(fitness, fitness)
    title = (f"Validation {label} per generation (lower is better)" if lower_is_better
             else f"Validation {label} per generation")
    axes.set_title(title + (f"\non the {rows}" if rows else ""), fontsize=11)
    axes.set_xlabel("generation")
    axes.set_ylabel(f"validation {label}")
    axes.set_xticks(list(range(max(total, 1))))
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)  # outside: it hides no point
    save_figure(figure, path)
    if clipped:
        side = "above" if lower_is_better else "below"
        extreme = max if lower_is_better else min
        notes.append(f"The worst candidate of {len(clipped)} generation(s) lies {side} the plotted range (up to "
                     f"{extreme(worst.values[i] for i in clipped):.4g}); it is drawn as an arrowhead at the edge "
                     f"with its value, so that best, median and parent stay readable.")
    if not parent_values:
        notes.append("The parent's line is missing: the population log has no reference row for it.")
    if tuned_values:
        notes.append("Candidates are fine-tuned before they are scored: the dotted line is the parent given the "
                     "same fine-tuning (the population log's generation -1 row), the dashed one the parent itself.")
    return notes


def save_figure(figure: Figure, path: Path) -> None:
    """Write ``figure`` as a PNG, atomically."""
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, dpi=110, format="png"))
