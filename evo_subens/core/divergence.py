"""Diverged candidates: children whose validation metrics are not finite numbers; and generations whose
fitness cannot tell the candidates apart (most of them tie on it).

A child diverges when its perturbation (too large a noise) or its tuning blows its weights up to inf/NaN. Such a candidate is still logged (``diverged = true``, NaN metrics), ranks last, and never
becomes an elite or a member; a generation in which every child diverged stops the run with a
:class:`~evo_subens.errors.DivergedError` naming the settings, once that generation is checkpointed.
The child family names the settings of a logged child and what to change (``Family.settings``,
``Family.divergence_advice``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable, Iterable

from ..errors import DivergedError

if TYPE_CHECKING:
    from ..families import Family
    from .search import CandidateRecord, Ranking


def is_diverged(values: Sequence[float]) -> bool:
    """Whether validation metrics show a diverged child (any NaN or infinite)."""
    return not all(math.isfinite(v) for v in values)


def _settings(rows: Iterable[dict], family: Family) -> str:
    """`` at <settings>`` of ``rows`` (population-log rows): their family's distinct settings, sorted; empty
    when the family names none."""
    settings = sorted({family.settings(row) for row in rows} - {""})
    return f" at {', '.join(settings)}" if settings else ""


def generation_note(rows: list[dict], generation: int, family: Family) -> str | None:
    """A progress line about the diverged candidates of ``generation`` (None when there are none); the
    generation is named by its population-log index, as everywhere else.

    ``rows`` are population-log rows (see :data:`~evo_subens.core.rundir.POPULATION_SCHEMA`).
    """
    latest = [r for r in rows if r["generation"] == generation]
    bad = [r for r in latest if r.get("diverged")]
    if not bad:
        return None
    return (f"[search] {len(bad)} of {len(latest)} candidates of generation {generation} diverged (NaN or "
            f"infinite validation metrics; logged with diverged=true, never elites or members)"
            f"{_settings(bad, family)}")


def check_generation(rows: list[dict], generation: int, family: Family, run_dir: object) -> None:
    """Raise :class:`DivergedError` when every candidate of ``generation`` diverged; the message names the
    settings that diverged and what to change (both from the run's child ``family``)."""
    latest = [r for r in rows if r["generation"] == generation]
    if not latest or not all(r.get("diverged") for r in latest):
        return
    raise DivergedError(
        f"every candidate of generation {generation} diverged (NaN or infinite validation metrics)"
        f"{_settings(latest, family)}: start a new run with {family.divergence_advice()}; {run_dir} keeps "
        f"population.parquet and its checkpoints (evo-subens resume {run_dir} goes on from them)")


def report_divergence(rows: list[dict], generation: int, family: Family, run_dir: object,
                      progress: Callable[[str], None]) -> None:
    """After a generation is logged and checkpointed: say how many of its candidates diverged, and stop
    the run (:class:`DivergedError`) when all of them did."""
    note = generation_note(rows, generation, family)
    if note:
        progress(note)
    check_generation(rows, generation, family, run_dir)


def summary_lines(rows: list[dict], num_classes: int, family: Family) -> list[str]:
    """Lines for the run's summary: how many candidates diverged, and a warning when members predict the
    validation split worse than a uniform guess (NLL above log(classes): finite, but broken children).

    ``rows`` are the final population-log rows (``is_member`` set), ``family`` the run's child family.
    """
    lines = []
    bad = [r for r in rows if r.get("diverged")]
    if bad:
        lines.append(f"diverged candidates: {len(bad)} of {len(rows)} (NaN or infinite validation metrics"
                     f"{_settings(bad, family)}); none is an elite or a member")
    chance = math.log(num_classes)
    weak = [r for r in rows if r["is_member"] and r["val_nll"] > chance]
    if weak:
        worst = max(r["val_nll"] for r in weak)
        lines.append(f"warning: {len(weak)} member(s) predict the validation split worse than a uniform guess "
                     f"(NLL up to {worst:.4g} > log {num_classes} = {chance:.2f}){_settings(weak, family)}: "
                     f"try {family.divergence_advice()}")
    return lines


def tie_note(records: Sequence[CandidateRecord], ranking: Ranking, scored_on: str) -> str | None:
    """A warning line when most of one generation's scored ``records`` share one fitness value (None
    otherwise): a coarse fitness (accuracy on a small validation split) leaves the choice among them to the
    ranking's tie-breaks. ``scored_on`` names the data the fitness is measured on."""
    values = [r.fitness for r in records if not r.diverged and not r.raced and math.isfinite(r.fitness)]
    if len(values) < 2:
        return None
    value, count = Counter(values).most_common(1)[0]
    if 2 * count <= len(values):
        return None
    metric = ranking.fitness_metric
    others = [m.name for m in ranking.ordered[1:]]
    fallback = (f"the ranking falls back to {others[0]}" if others else "the choice among them is by candidate id")
    advice = (f"search.fitness: {others[0]} tells them apart" if others
              else "a larger validation split may tell them apart")
    generation = records[0].generation
    return (f"[search] warning: {count} of {len(values)} candidates of generation {generation} tie at val "
            f"{metric.short} {value:.4f} on the {scored_on}, so the fitness cannot rank them ({fallback}); "
            f"{advice} (said once, for the first generation that ties)")


class TieWarning:
    """:func:`tie_note` for each generation until one ties: the warning is said once per run, not once per
    generation."""

    def __init__(self, ranking: Ranking, scored_on: str):
        self.ranking, self.scored_on, self.said = ranking, scored_on, False

    def check(self, records: Sequence[CandidateRecord]) -> str | None:
        """The warning for this generation's ``records`` if it is the first to tie, else None."""
        if self.said:
            return None
        note = tie_note(records, self.ranking, self.scored_on)
        self.said = note is not None
        return note
