"""Feature visualisation: the input that most excites a unit, for comparing members neuron by neuron.

Members of a subnetwork ensemble share the parent's architecture, so unit ``j`` of the penultimate
layer (the classifier's inputs) is "the same neuron" in every member. Activation maximisation finds, by
gradient ascent on the input, a pattern that drives that unit up; laid out as a member x unit grid it
shows whether members kept the parent's feature, changed it, or lost it (a pruned unit stays blank).

Regularisers, as usual for activation maximisation (Erhan et al., 2009; Olah et al., 2017): an L2
penalty on the input, total variation along the signal/image axes, random jitter (a roll of up to
``jitter`` samples/pixels per step), and clamping to the data's value range. Each unit starts from the
training sample that excites it most in the parent, the same start for every member, so differences
come from the members.

    >>> units = pick_units(model, input_shape, count=6, seed=0)
    >>> inputs = maximise_units(model, units, start=starting_inputs(model, units, train_x),
    ...                         bounds=(train_x.min().item(), train_x.max().item()))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..tasks.classification.models import classifier_inputs


@dataclass(frozen=True)
class Regularisers:
    """Settings of the gradient ascent; defaults suit inputs standardised to about unit scale."""

    steps: int = 200
    lr: float = 0.05
    l2: float = 0.1
    total_variation: float = 0.5
    jitter: int = 1


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier layer's inputs (flattened) for ``x``, with gradients flowing back to ``x``."""
    with classifier_inputs(model) as captured:
        model(x)
    return captured[0]


def pick_units(model: nn.Module, input_shape: tuple[int, ...], count: int, seed: int) -> list[int]:
    """``count`` distinct penultimate units chosen at random (seeded), in increasing order."""
    with torch.no_grad():
        width = penultimate_features(model.eval(), torch.zeros(1, *input_shape)).shape[1]
    picked = np.random.default_rng(seed).choice(width, size=min(count, width), replace=False)
    return sorted(int(u) for u in picked)


def starting_inputs(model: nn.Module, units: list[int], data_x: torch.Tensor, pool: int = 2000) -> torch.Tensor:
    """For each unit, the sample among the first ``pool`` of ``data_x`` that excites it most in ``model``.

    Starting from a real, strongly activating input (rather than noise) gives every unit a gradient to
    follow: a ReLU unit that is silent at the start would never move.
    """
    candidates = data_x[:pool].float()
    with torch.no_grad():
        features = penultimate_features(model.eval(), candidates)
    return candidates[features[:, torch.tensor(units)].argmax(dim=0)].clone()


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbours along every signal/image axis (not batch/channel)."""
    axes = range(2, x.dim()) if x.dim() > 2 else range(1, x.dim())
    return sum((x.diff(dim=axis).abs().mean() for axis in axes), torch.zeros(()))


def maximise_units(model: nn.Module, units: list[int], start: torch.Tensor,
                   bounds: tuple[float, float], settings: Regularisers = Regularisers(),
                   seed: int = 0) -> torch.Tensor:
    """Inputs that maximise each unit of ``units`` (row i drives ``units[i]``), found from ``start``.

    The model's weights are not changed; its mode is set to eval (dropout off, batch-norm statistics
    fixed) so the objective is deterministic.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        x = start.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([x], lr=settings.lr)
        generator = torch.Generator().manual_seed(seed)
        index = torch.arange(len(units))
        target = torch.tensor(units)
        spatial = tuple(range(2, x.dim())) if x.dim() > 2 else (1,)
        # Activations are measured relative to the start's, so the regulariser weights mean the same for
        # every unit and model; the input penalties are in units of the data's range, about its centre.
        with torch.no_grad():
            scale = penultimate_features(model, start)[index, target].abs().clamp_min(1e-3)
        centre, spread = (bounds[0] + bounds[1]) / 2, (bounds[1] - bounds[0]) / 2
        for _ in range(settings.steps):
            shifts = torch.randint(-settings.jitter, settings.jitter + 1, (len(spatial),), generator=generator)
            shifted = torch.roll(x, shifts=[int(s) for s in shifts], dims=spatial) if settings.jitter else x
            activation = penultimate_features(model, shifted)[index, target] / scale
            standardised = (x - centre) / spread
            loss = -activation.mean() + settings.l2 * standardised.pow(2).mean() + \
                settings.total_variation * _total_variation(standardised)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                x.clamp_(*bounds)
        return x.detach()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def unit_activations(model: nn.Module, units: list[int], inputs: torch.Tensor) -> torch.Tensor:
    """Activation of ``units[i]`` on ``inputs[i]`` (how strongly each visualisation drives its unit)."""
    with torch.no_grad():
        return penultimate_features(model.eval(), inputs)[torch.arange(len(units)), torch.tensor(units)]
