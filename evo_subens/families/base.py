"""The interface every child family implements.

A family turns parent genomes into child genomes (on the driver, from the search's RNG) and turns a
genome into weights (in a worker, on a model that holds the parent's weights). Genomes are compact
JSON strings so they cross process boundaries in a few bytes and sit in the population log as is.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from torch import nn

from ..core.config import ChildrenConfig

Undo = Callable[[], None]


def encode_genome(genome: dict) -> str:
    """Canonical JSON text of a genome: the same genome always gives the same string."""
    return json.dumps(genome, separators=(",", ":"), sort_keys=True)


def decode_genome(text: str) -> dict:
    """Inverse of :func:`encode_genome`."""
    return json.loads(text)


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

    name: str
    # Scoring a child trains it (sparse tuning): workers then get the training split, and a child's
    # weights are no longer cheap to rebuild from its genome, so members' weights are stored.
    trains_children: bool = False

    def __init__(self, cfg: ChildrenConfig):
        self.cfg = cfg

    @abstractmethod
    def root(self, parent_id: str) -> str:
        """The genome of the unmodified parent ``parent_id`` (the search's starting point)."""

    @abstractmethod
    def propose(self, parents: Sequence[str], count: int, rng: np.random.Generator, *,
                step_scale: float = 1.0) -> list[tuple[int, str]]:
        """``count`` new genomes, each paired with the index in ``parents`` of the genome it extends
        (-1: derived from the trained parent itself); ``step_scale`` scales the size of new perturbations
        (the search's step-size adaptation; families whose children have no step size ignore it)."""

    @abstractmethod
    def bind(self, model: nn.Module, train_data: Any = None) -> Materialiser:
        """A materialiser for ``model``, which must hold the root parent's weights; ``train_data`` (a
        :class:`~evo_subens.tasks.classification.data.Split`) is given to families that train children."""

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

    @abstractmethod
    def describe(self, genome: str) -> dict[str, Any]:
        """Flat, typed fields of a genome for the population log (e.g. seed, density, sigma)."""
