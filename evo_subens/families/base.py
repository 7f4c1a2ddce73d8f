"""The interface every child family implements.

A family is one module: its config section (a :class:`~evo_subens.core.config.ChildrenConfig` subclass
with its fields, docs and checks), its population-log columns, and a :class:`Family` subclass that turns
parent genomes into child genomes (on the driver, from the search's RNG) and a genome into weights (in a
worker, on a model that holds the parent's weights). Registering it
(:func:`evo_subens.families.register_family`) makes ``children.family`` accept its name. Genomes are
compact JSON strings so they cross process boundaries in a few bytes and sit in the population log as is.

Families know nothing of the task: a family that trains its children is given a :class:`ChildTrainer`
by the task (classification: SGD on the training split; rl: PPO on training episodes).
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping, Protocol, Sequence

import numpy as np
from torch import nn

from ..core.config import ChildrenConfig, TrainConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    import torch

Undo = Callable[[], None]


def encode_genome(genome: dict) -> str:
    """Canonical JSON text of a genome: the same genome always gives the same string."""
    return json.dumps(genome, separators=(",", ":"), sort_keys=True)


def decode_genome(text: str) -> dict:
    """Inverse of :func:`encode_genome`."""
    return json.loads(text)


def check_patterns(path: str, patterns: Any) -> None:
    """A section's parameter-name patterns must be a non-empty list of glob strings."""
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(path, "a non-empty list of glob patterns (strings)", patterns)


class ChildTrainer(Protocol):
    """Trains a child in place on the task's training data; given to families that train children.

    ``len(trainer)`` is the number of training samples. ``train`` runs ``cfg.epochs`` epochs from a batch
    order seeded with ``seed``; ``parameter_filter(model)`` runs after every optimiser step (a fixed mask
    re-applied), ``forward(model, x, step)`` replaces ``model(x)`` for the training outputs (a mask sampled
    per step), ``subset`` (indices of training samples) restricts training to those samples. ``steps``
    is the number of optimiser steps ``train`` takes on ``samples`` samples.
    """

    def __len__(self) -> int: ...

    def train(self, model: nn.Module, cfg: TrainConfig, *, seed: int,
              parameter_filter: Callable[[nn.Module], None] | None = None,
              forward: Callable[[nn.Module, torch.Tensor, int], torch.Tensor] | None = None,
              subset: np.ndarray | None = None) -> None: ...

    def steps(self, cfg: TrainConfig, samples: int) -> int: ...


@dataclass
class ReportSection:
    """A family's own part of a run's report: a ``## title`` with markdown lines and plots (file name ->
    matplotlib Figure, saved beside report.md and shown under the text)."""

    title: str
    lines: list[str]
    plots: dict[str, Any] = field(default_factory=dict)


class Materialiser(ABC):
    """Holds a model with the parent's weights and writes children's weights into it in place."""

    @abstractmethod
    def apply(self, genome: str) -> Undo:
        """Turn the model into the child ``genome``; the returned callable restores the parent exactly."""

    @contextlib.contextmanager
    def materialised(self, genome: str) -> Iterator[None]:
        """Context in which the bound model is the child ``genome``."""
        undo = self.apply(genome)
        try:
            yield
        finally:
            undo()


class Family(ABC):
    """How children are derived from a parent. Adding a family is one module and one registry entry."""

    name: ClassVar[str]  # its registry name, and the default of its section's ``family``
    config: ClassVar[type[ChildrenConfig]]  # its config section
    # Its population-log columns (name -> pandas dtype), in order; :meth:`describe` fills exactly these.
    log_columns: ClassVar[dict[str, str]]
    # Columns older logs wrote under another name (old name -> column); other old columns are dropped.
    legacy_log_columns: ClassVar[dict[str, str]] = {}
    # Scoring a child trains it (sparse tuning): workers then get the training split, and a child's
    # weights are no longer cheap to rebuild from its genome, so members' weights are stored.
    trains_children: ClassVar[bool] = False

    def __init__(self, cfg: ChildrenConfig):
        self.cfg = cfg

    @abstractmethod
    def root(self, parent_id: str) -> str:
        """The genome of the unmodified parent ``parent_id`` (the search's starting point)."""

    @abstractmethod
    def propose(self, parents: Sequence[str], count: int, rng: np.random.Generator, *,
                step_scale: float | Sequence[float] = 1.0) -> list[tuple[int, str]]:
        """``count`` new genomes, each paired with the index in ``parents`` of the genome it extends
        (-1: derived from the trained parent itself); ``step_scale`` scales the size of new perturbations,
        for all of them or (a sequence) for each (the search's step-size adaptation; families whose
        children have no step size ignore it)."""

    @abstractmethod
    def bind(self, model: nn.Module, trainer: ChildTrainer | None = None) -> Materialiser:
        """A materialiser for ``model``, which must hold the root parent's weights; ``trainer`` is given to
        families that train children (without one, their children are materialised untrained)."""

    @abstractmethod
    def describe(self, genome: str) -> dict[str, Any]:
        """The genome's values of :attr:`log_columns`, for its row of the population log."""

    def log_row(self, genome: str, step_scale: float) -> dict[str, Any]:
        """:meth:`describe` for a candidate made with ``step_scale`` times the configured step (the row's
        ``step_scale``), for families whose columns depend on it."""
        return self.describe(genome)

    @classmethod
    def complete_log(cls, frame: pd.DataFrame) -> pd.DataFrame:
        """A population log written before some of :attr:`log_columns` existed, with them filled in."""
        return frame

    def mutated_parameters(self, model: nn.Module) -> list[str] | None:
        """Names of the only parameters children can differ from the parent in, when the family knows
        them without training (evaluation then caches activations before them); None: any parameter."""
        return None

    def constraint(self, genome: str, materialiser: Materialiser) -> Callable[[nn.Module], None] | None:
        """What must hold while a member is fine-tuned (e.g. re-applying its mask); None: nothing."""
        return None

    def pack(self, state: dict, genome: str, materialiser: Materialiser) -> dict:
        """A member's weights as stored in the run directory (families may store them compactly)."""
        return state

    def unpack(self, packed: dict, genome: str, materialiser: Materialiser) -> dict:
        """Inverse of :meth:`pack`."""
        return packed

    # ---- what runs and reports say about the family's children

    def summary(self) -> str:
        """The family's settings in a few words, for the report's first line."""
        return ", ".join(f"{name} {value}" for name, value in vars(self.cfg).items() if name != "family")

    def settings(self, row: Mapping[str, Any]) -> str:
        """The settings a logged candidate (a population-log row) was made with, e.g. ``density 0.1 x
        sigma 0.5``: messages about diverged children group them by it. Empty: nothing to name."""
        return ""

    def divergence_advice(self) -> str:
        """What to change when children diverge (NaN or infinite metrics), e.g. ``a smaller children.sigma``."""
        return "gentler children settings"

    def report_sections(self, population: pd.DataFrame) -> list[ReportSection]:
        """Sections of the run's report only this family has (e.g. a plot over its own log columns)."""
        return []
