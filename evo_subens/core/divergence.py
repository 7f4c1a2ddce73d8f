"""Diverged candidates: children whose validation metrics are not finite numbers.

A child diverges when its perturbation (too large a noise) or its tuning blows its weights up to inf/NaN. Such a candidate is still logged (``diverged = true``, NaN metrics), ranks last, and never
becomes an elite or a member; a generation in which every child diverged stops the run with a
:class:`~evo_subens.errors.DivergedError` naming the settings, once that generation is checkpointed.
The child family names the settings of a logged child and what to change (``Family.settings``,
``Family.divergence_advice``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable, Iterable

from ..errors import DivergedError

if TYPE_CHECKING:
    from ..families import Family


def is_diverged(values: Sequence[float]) -> bool:
    """Whether validation metrics show a diverged child (any NaN or infinite)."""
    return not all(math.isfinite(v) for v in values)


def _settings(rows: Iterable[dict], family: Family) -> str:
    """`` at <settings>`` of ``rows`` (population-log rows): their family's distinct settings, sorted; empty
    when the family names none."""
    settings = sorted({family.settings(row) for row in rows} - {""})
    return f" at {', '.join(settings)}" if settings else ""


def generation_note(rows: list[dict], generation: int, family: Family) -> str | None:
    """A progress line about the diverged candidates of ``generation`` (None when there are none).

    ``rows`` are population-log rows (see :data:`~evo_subens.core.rundir.POPULATION_SCHEMA`).
    """
    latest = [r for r in rows if r["generation"] == generation]
    bad = [r for r in latest if r.get("diverged")]
    if not bad:
        return None
    return (f"[search] {len(bad)} of {len(latest)} candidates of generation {generation + 1} diverged (NaN or "
            f"infinite validation metrics; logged with diverged=true, never elites or members)"
            f"{_settings(bad, family)}")


def check_generation(rows: list[dict], generation: int, family: Family, run_dir: object) -> None:
    """Raise :class:`DivergedError` when every candidate of ``generation`` diverged; the message names the
    settings that diverged and what to change (both from the run's child ``family``)."""
    latest = [r for r in rows if r["generation"] == generation]
    if not latest or not all(r.get("diverged") for r in latest):
        return
    raise DivergedError(
        f"every candidate of generation {generation + 1} diverged (NaN or infinite validation metrics)"
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
