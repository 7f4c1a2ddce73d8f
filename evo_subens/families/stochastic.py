"""Stochastic children (Stochastic Subnetwork Annealing): pruning masks that become fixed gradually.

A child has the same target mask as a sparse child (random, anti-random or partition, over connections
or whole units, the classifier never pruned), but while it is tuned every prunable unit carries an
inclusion probability, and every training forward pass runs on a Bernoulli mask sampled from them: a
unit is sometimes in the subnetwork and sometimes not. Over the first ``anneal_fraction`` of the tuning
steps the probabilities are annealed from ``anneal_start`` (every unit alike) to the target (1 for kept
units, 0 for pruned ones); from then on the mask is exactly the target, pruned weights are zeroed and
re-zeroed after every optimiser step, so the scored child is the parent under its final deterministic
mask, with pruned weights exactly zero.

The probabilities are written as a distance ``d(u)`` from the target, 1 at the start of annealing and 0
at its end (``u`` is the progress through the annealing window, in [0, 1]): kept units have
``p = 1 - (1 - start) d(u)``, pruned ones ``p = start d(u)``. Schedules: ``linear`` d = 1 - u;
``cosine`` d = (1 + cos(pi u)) / 2; ``exponential`` d = (e^(-k u) - e^(-k)) / (1 - e^(-k)) with k = 5
(most of the change early). Each is monotone and exactly 0 at u = 1. A starting probability rather
than a temperature keeps one number with a direct meaning: the share of units (of either kind) in
the first sampled subnetworks.

Sampling is one ``torch.rand`` over the flat vector of all prunable units per step, from a generator
seeded with (the child's tuning seed, the step), so the mask of a step is a function of the genome and
the step alone, in any process. The annealing settings travel in the genome's ``space``.

Config (``children:`` with ``family: stochastic``): :class:`StochasticConfig`, the sparse family's
fields plus the annealing ones. Population-log columns: the sparse family's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..core.config import RunConfig
from ..core.options import option
from ..errors import ConfigError
from .noisy import SEED_BOUND
from .base import ChildTrainer
from .sparse import SparseConfig, SparseFamily, SparseMaterialiser, unit_masks

EXPONENTIAL_RATE = 5.0  # e^-5 ~ 0.7%: the exponential schedule covers ~2/3 of the way in the first fifth


def _exponential(u: float) -> float:
    floor = math.exp(-EXPONENTIAL_RATE)
    return (math.exp(-EXPONENTIAL_RATE * u) - floor) / (1.0 - floor)


# Distance from the target mask at progress u in [0, 1): the schedules children.anneal_schedule names.
SCHEDULES: dict[str, Callable[[float], float]] = {
    "linear": lambda u: 1.0 - u,
    "cosine": lambda u: 0.5 * (1.0 + math.cos(math.pi * u)),
    "exponential": _exponential,
}


@dataclass
class StochasticConfig(SparseConfig):
    """``children`` of the stochastic family: the sparse family's target masks, annealed while tuned."""

    family: str = "stochastic"
    anneal_schedule: str = option("cosine", "how inclusion probabilities move from anneal_start to the target "
                                            "mask (1 kept, 0 pruned)", choices=tuple(SCHEDULES))
    anneal_start: float = option(0.5, "inclusion probability of every prunable unit, kept or pruned, at the "
                                      "first tuning step", ge=0, le=1)
    anneal_fraction: float = option(0.5, "share of the tuning steps over which probabilities are annealed; "
                                         "afterwards the mask is exactly the target", ge=0, le=1)

    def check(self, run: RunConfig) -> None:
        super().check(run)
        if self.tune.epochs == 0:
            raise ConfigError("children.tune.epochs", "at least 1 for stochastic children (annealing happens "
                                                      "while tuning)", self.tune.epochs)


def distance(schedule: str, progress: float) -> float:
    """Distance from the target mask, 1 at ``progress`` 0 and exactly 0 at ``progress`` >= 1."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown anneal schedule {schedule!r}")
    u = min(max(progress, 0.0), 1.0)
    return 0.0 if u >= 1.0 else SCHEDULES[schedule](u)


def inclusion_probabilities(schedule: str, start: float, progress: float) -> tuple[float, float]:
    """(kept units', pruned units') inclusion probability at ``progress`` through the annealing window."""
    d = distance(schedule, progress)
    return 1.0 - (1.0 - start) * d, start * d


def anneal_steps(fraction: float, total_steps: int) -> int:
    """Tuning steps over which probabilities are annealed (the rest use the exact target mask)."""
    return round(fraction * total_steps)


class MaskAnnealer:
    """Per-step Bernoulli masks of one child, annealed towards its target mask.

    ``forward`` and ``after_step`` plug into :meth:`~evo_subens.families.base.ChildTrainer.train`: during
    the annealing window ``forward`` runs the model with its prunable parameters multiplied by a freshly sampled mask
    (gradients reach only the sampled-in entries through the loss); afterwards it zeroes the pruned
    weights once and runs the model as is, and ``after_step`` re-zeroes them after every optimiser step.
    """

    def __init__(self, materialiser: SparseMaterialiser, target: list[torch.Tensor], *, schedule: str,
                 start: float, steps: int, seed: int):
        self.materialiser = materialiser
        self.device = target[0].device
        self.counts = [len(t) for t in target]
        self.target = torch.cat(target)
        self.target_masks = materialiser.expand(target)
        self.schedule = schedule
        self.start = start
        self.steps = steps
        self.seed = seed
        self.generator = torch.Generator(device=self.device)
        self.fixed = False

    def probabilities(self, step: int) -> torch.Tensor:
        """Inclusion probability of every prunable unit (flat, layer after layer) at ``step``."""
        keep, prune = inclusion_probabilities(self.schedule, self.start, self._progress(step))
        return torch.where(self.target, keep, prune)

    def _progress(self, step: int) -> float:
        return step / self.steps if self.steps > 0 else 1.0

    def sample_units(self, step: int) -> torch.Tensor:
        """The flat boolean unit mask of ``step``: exactly the target once annealing is over."""
        if step >= self.steps:
            return self.target
        # A fresh seed per step makes the mask a function of (genome, step), not of what ran before.
        step_seed = int(np.random.default_rng([self.seed, step]).integers(SEED_BOUND))
        self.generator.manual_seed(step_seed)
        keep, prune = inclusion_probabilities(self.schedule, self.start, self._progress(step))
        noise = torch.rand(len(self.target), generator=self.generator, device=self.device)
        return noise < torch.where(self.target, keep, prune)

    def sample(self, step: int) -> dict[str, torch.Tensor]:
        """Parameter-shaped boolean masks of ``step``."""
        if step >= self.steps:
            return self.target_masks
        return self.materialiser.expand(torch.split(self.sample_units(step), self.counts))

    def forward(self, model: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
        """Training logits of ``x`` at ``step`` under that step's mask."""
        if step >= self.steps:
            if not self.fixed:  # entering the fixed phase: pruned weights leave the network for good
                self.fixed = True
                self.after_step(model)
            return model(x)
        params = dict(model.named_parameters())
        masked = {name: params[name] * mask for name, mask in self.sample(step).items()}
        return functional_call(model, masked, (x,))

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Zero the pruned weights once the mask is fixed (after every optimiser step from then on)."""
        if self.fixed:
            params = dict(model.named_parameters())
            for name, mask in self.target_masks.items():
                params[name].mul_(mask)


class StochasticMaterialiser(SparseMaterialiser):
    """Sparse materialiser whose tuning anneals the mask instead of fixing it from the first step."""

    family = "stochastic"

    def annealer(self, mask: dict, seed: int, total_steps: int) -> MaskAnnealer:
        """The annealer of the child with mask spec ``mask`` and tuning seed ``seed``."""
        device = next(self.model.parameters()).device
        target = [torch.from_numpy(k).to(device) for k in unit_masks(mask, self.unit_counts(), self.space["scope"])]
        anneal = self.space["anneal"]
        return MaskAnnealer(self, target, schedule=anneal["schedule"], start=anneal["start"],
                            steps=anneal_steps(anneal["fraction"], total_steps),
                            seed=int(np.random.default_rng([seed, 4]).integers(SEED_BOUND)))

    def tune_child(self, mask: dict, subset: np.ndarray | None, seed: int,
                   apply_mask: Callable[[nn.Module], None]) -> None:
        """Tune the child in place with annealed masks; pruned weights end exactly zero."""
        samples = len(self.trainer) if subset is None else len(subset)
        annealer = self.annealer(mask, seed, self.trainer.steps(self.tune, samples))
        self.trainer.train(self.model, self.tune, seed=seed, forward=annealer.forward,
                           parameter_filter=annealer.after_step, subset=subset)
        apply_mask(self.model)  # annealing may have run to the last step (fraction 1)


class StochasticFamily(SparseFamily):
    """Children with sparse target masks, annealed from stochastic to fixed while they are tuned."""

    name = "stochastic"
    config = StochasticConfig

    def __init__(self, cfg: StochasticConfig):
        super().__init__(cfg)
        self.space = dict(self.space, anneal={"schedule": cfg.anneal_schedule, "start": cfg.anneal_start,
                                              "fraction": cfg.anneal_fraction})

    def bind(self, model: nn.Module, trainer: ChildTrainer | None = None) -> StochasticMaterialiser:
        return StochasticMaterialiser(model, self.space, self.cfg.tune, trainer)

    def summary(self) -> str:
        cfg = self.cfg
        return (f"{super().summary()}, annealed ({cfg.anneal_schedule}) from {cfg.anneal_start} over "
                f"{cfg.anneal_fraction:.0%} of tuning")
