"""Noisy children (sparse mutation decompositions): child = parent + sigma * (mask * eps).

The mask picks a ``density`` fraction of the eligible parameters; eps ~ N(0, I). Mutations compound:
a child of an elite carries the elite's mutation steps plus one of its own, so a genome is the list of
steps from the root parent::

    {"family": "noisy", "parent": "<parent id>", "space": {...},
     "steps": [[mask_seed, noise_seed, density, sigma], ...]}

Masks come from NumPy's ``Generator.choice`` and noise from a CPU ``torch.Generator``, both seeded by
the genome, so a genome gives the same weights in any process (bit for bit on the same device type).

Config (``children:`` with ``family: noisy``): :class:`NoisyConfig`. Population-log columns: the
candidate's own (last) mutation step, ``seed`` (noise seed), ``mask_seed``, ``density``, ``sigma``, and
``depth``, the mutations from the trained parent.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.config import ChildrenConfig, RunConfig
from ..core.options import option
from ..errors import ConfigError
from ..nn import output_parameter_names
from .base import ChildTrainer, Family, Materialiser, ReportSection, Undo, check_patterns, decode_genome, encode_genome

if TYPE_CHECKING:
    import pandas as pd

SEED_BOUND = 2**62  # seeds stay exact in JSON, int64 Parquet columns and torch.Generator


@dataclass
class NoisyConfig(ChildrenConfig):
    """``children`` of the noisy family."""

    family: str = "noisy"
    density: float = option(0.1, "fraction of the eligible parameters each mutation perturbs "
                                  "(1.0 = dense noise)", gt=0, le=1)
    sigma: float = option(0.5, "noise standard deviation (absolute, or a multiple of each layer's "
                               "weight std when sigma_mode is relative)", ge=0)
    sigma_mode: str = option("relative", "scale of sigma", choices=("absolute", "relative"))
    subspace: str = option("dynamic", "static: one mask per generation; dynamic: a fresh mask per child",
                           choices=("static", "dynamic"))
    layers: list = option(["*"], "glob patterns over parameter names (e.g. 'features.*', '*.weight') "
                                 "selecting the eligible parameters")
    include_classifier: bool = option(True, "whether the output (classifier) layer may be perturbed")
    density_grid: list = option([], "sweep: densities crossed with sigma_grid, children cycling through the "
                                    "pairs (the mutation window); [] = density only")
    sigma_grid: list = option([], "sweep: sigmas crossed with density_grid; [] = sigma only")

    def check(self, run: RunConfig) -> None:
        super().check(run)
        check_patterns("children.layers", self.layers)
        grids = {"density_grid": ("numbers in (0, 1]", lambda g: 0 < g <= 1),
                 "sigma_grid": ("finite numbers >= 0", lambda g: 0 <= g < math.inf)}
        for name, (wanted, valid) in grids.items():
            grid = getattr(self, name)
            if not all(isinstance(g, (int, float)) and not isinstance(g, bool) and valid(g) for g in grid):
                raise ConfigError(f"children.{name}", f"a list of {wanted}", grid)


def eligible_parameter_names(model: nn.Module, patterns: Sequence[str], include_classifier: bool) -> list[str]:
    """Names of the parameters that mutations may touch, in ``named_parameters`` order."""
    excluded = set() if include_classifier else set(output_parameter_names(model))
    names = [name for name, _ in model.named_parameters()
             if name not in excluded and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not names:
        available = ", ".join(name for name, _ in model.named_parameters())
        raise ConfigError("children.layers", f"patterns that match at least one parameter "
                                             f"(parameters: {available})", list(patterns))
    return names


class NoisyMaterialiser(Materialiser):
    """Writes noisy children into a model in place; the eligible parameters share one flat buffer."""

    def __init__(self, model: nn.Module, space: dict[str, Any]):
        self.space = space
        params = dict(model.named_parameters())
        names = eligible_parameter_names(model, space["layers"], space["include_classifier"])
        tensors = [params[name] for name in names]
        self.device = tensors[0].device
        with torch.no_grad():
            self.flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            offset = 0
            # Re-point each parameter at its slice of the buffer, so one index_put mutates the model.
            for t in tensors:
                t.data = self.flat[offset:offset + t.numel()].view_as(t)
                offset += t.numel()
        self.size = offset
        sizes = torch.tensor([t.numel() for t in tensors])
        self.ends = sizes.cumsum(0)
        if space["sigma_mode"] == "relative":
            self.scales = torch.stack([t.detach().float().std(unbiased=False).cpu() for t in tensors])
            self.scales = torch.nan_to_num(self.scales)
        else:
            self.scales = torch.ones(len(tensors))
        self.sizes = sizes
        self._mask_cache: tuple[tuple[int, float], torch.Tensor | None] | None = None

    def _indices(self, mask_seed: int, density: float) -> torch.Tensor | None:
        """Distinct indices of the mutated parameters; None means all of them."""
        if density >= 1.0:
            return None
        key = (mask_seed, density)
        if self._mask_cache is not None and self._mask_cache[0] == key:
            return self._mask_cache[1]  # static subspaces reuse one mask for a whole generation
        count = max(1, round(density * self.size))
        picked = np.random.default_rng(mask_seed).choice(self.size, size=count, replace=False)
        index = torch.from_numpy(picked)
        self._mask_cache = (key, index)
        return index

    def _delta(self, index: torch.Tensor | None, noise_seed: int, sigma: float) -> torch.Tensor:
        count = self.size if index is None else len(index)
        eps = torch.randn(count, generator=torch.Generator().manual_seed(noise_seed))
        if index is None:
            scale = torch.repeat_interleave(self.scales, self.sizes)
        else:
            scale = self.scales[torch.bucketize(index, self.ends, right=True)]
        return (eps * scale * sigma).to(self.device, non_blocking=True)

    @torch.no_grad()
    def apply(self, genome: str) -> Undo:
        spec = decode_genome(genome)
        if spec.get("family") != "noisy" or spec.get("space") != self.space:
            raise ValueError(f"genome does not belong to this noisy subspace: {genome[:200]}")
        saved: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        for mask_seed, noise_seed, density, sigma in spec["steps"]:
            index = self._indices(mask_seed, density)
            delta = self._delta(index, noise_seed, sigma)
            if index is None:
                saved.append((None, self.flat.clone()))
                self.flat.add_(delta)
            else:
                index = index.to(self.device, non_blocking=True)
                saved.append((index, self.flat[index]))
                self.flat.index_put_((index,), delta, accumulate=True)

        @torch.no_grad()
        def undo() -> None:
            # Restoring saved values (not subtracting the noise) makes the parent come back bit for bit.
            for index, values in reversed(saved):
                if index is None:
                    self.flat.copy_(values)
                else:
                    self.flat[index] = values

        return undo


class NoisyFamily(Family):
    """Children are sparse (or dense) Gaussian mutations of their parent genome."""

    name = "noisy"
    config = NoisyConfig
    log_columns = {
        "seed": "int64",       # noise seed of the candidate's own (last) mutation; -1: the trained parent
        "mask_seed": "int64",  # mask seed of that mutation
        "density": "float64",  # share of the eligible parameters it perturbed
        "sigma": "float64",    # its noise scale
        "grid_sigma": "float64",  # the configured sigma it was made from (its sigma_grid point, or
                                  # children.sigma), before the search scaled its step: group sweeps by it
        "depth": "int64",      # mutations from the trained parent
    }

    def __init__(self, cfg: NoisyConfig):
        super().__init__(cfg)
        self.space = {"layers": list(cfg.layers), "include_classifier": cfg.include_classifier,
                      "sigma_mode": cfg.sigma_mode}

    def root(self, parent_id: str) -> str:
        """Genome of the unmodified parent ``parent_id``."""
        return encode_genome({"family": self.name, "parent": parent_id, "space": self.space, "steps": []})

    def propose(self, parents: Sequence[str], count: int, rng: np.random.Generator, *,
                step_scale: float | Sequence[float] = 1.0) -> list[tuple[int, str]]:
        # Static subspaces share one mask per generation; dynamic ones draw a mask per child.
        static_mask = int(rng.integers(SEED_BOUND)) if self.cfg.subspace == "static" else None
        settings = self.mutation_settings()
        children = []
        for i in range(count):
            parent_index = i % len(parents)  # round robin over the parents, best first
            mask_seed = static_mask if static_mask is not None else int(rng.integers(SEED_BOUND))
            noise_seed = int(rng.integers(SEED_BOUND))
            density, sigma = settings[i % len(settings)]
            scale = step_scale if isinstance(step_scale, (int, float)) else step_scale[i]
            sigma = sigma * scale if scale != 1.0 else sigma  # exact config sigma while unscaled
            spec = decode_genome(parents[parent_index])
            spec["steps"] = spec["steps"] + [[mask_seed, noise_seed, density, sigma]]
            children.append((parent_index, encode_genome(spec)))
        return children

    def mutation_settings(self) -> list[tuple[float, float]]:
        """(density, sigma) pairs children cycle through: the grid of a mutation-window sweep, or the one
        configured pair."""
        densities = [float(d) for d in self.cfg.density_grid] or [self.cfg.density]
        sigmas = [float(s) for s in self.cfg.sigma_grid] or [self.cfg.sigma]
        return [(d, s) for d in densities for s in sigmas]

    def mutated_parameters(self, model: nn.Module) -> list[str]:
        return eligible_parameter_names(model, self.space["layers"], self.space["include_classifier"])

    def bind(self, model: nn.Module, trainer: ChildTrainer | None = None) -> NoisyMaterialiser:
        return NoisyMaterialiser(model, self.space)

    def describe(self, genome: str) -> dict[str, Any]:
        return self.log_row(genome, 1.0)

    def log_row(self, genome: str, step_scale: float) -> dict[str, Any]:
        steps = decode_genome(genome)["steps"]
        if not steps:
            return {"seed": -1, "mask_seed": -1, "density": 0.0, "sigma": 0.0, "grid_sigma": 0.0, "depth": 0}
        mask_seed, noise_seed, density, sigma = steps[-1]
        return {"seed": noise_seed, "mask_seed": mask_seed, "density": float(density), "sigma": float(sigma),
                "grid_sigma": self._grid_sigma(float(sigma) / step_scale), "depth": len(steps)}

    def _grid_sigma(self, unscaled: float) -> float:
        """The configured sigma nearest ``unscaled`` (a logged sigma divided by its step scale, equal to the
        configured one but for float rounding)."""
        configured = {s for _, s in self.mutation_settings()}
        return min(configured, key=lambda s: abs(s - unscaled))

    @classmethod
    def complete_log(cls, frame: pd.DataFrame) -> pd.DataFrame:
        if "grid_sigma" not in frame.columns:  # logs from before it: the step-scaled sigma, unscaled
            at = list(frame.columns).index("sigma") + 1
            frame.insert(at, "grid_sigma", (frame["sigma"] / frame["step_scale"]).where(frame["depth"] > 0, 0.0))
        return frame

    def summary(self) -> str:
        densities = self.cfg.density_grid or [self.cfg.density]
        sigmas = self.cfg.sigma_grid or [self.cfg.sigma]
        return (f"density {', '.join(map(str, densities))}, sigma {', '.join(map(str, sigmas))} "
                f"({self.cfg.sigma_mode})")

    def settings(self, row: Mapping[str, Any]) -> str:
        return f"density {row['density']:g} x sigma {row['sigma']:g}"

    def divergence_advice(self) -> str:
        return f"a smaller children.sigma (sigma_mode {self.cfg.sigma_mode})"

    def report_sections(self, population: pd.DataFrame) -> list[ReportSection]:
        """The mutation window, when generation 0 swept several sigmas: its mean validation accuracy
        against sigma, one line per density."""
        first = population[population["generation"] == 0]
        if first["grid_sigma"].nunique() < 2:
            return []
        window = (first.groupby(["density", "grid_sigma"])["val_accuracy"].mean().reset_index()
                  .rename(columns={"grid_sigma": "sigma"}))
        from matplotlib.figure import Figure  # only reports draw

        figure = Figure(figsize=(6.4, 4.0))
        axes = figure.subplots()
        for density, rows in window.groupby("density"):
            axes.plot(rows["sigma"], rows["val_accuracy"], "o-", label=f"density {density:g}")
        if (window["sigma"] > 0).all():
            axes.set_xscale("log")
        axes.set_title("Mutation window: validation accuracy vs noise")
        axes.set_xlabel("sigma")
        axes.set_ylabel("validation accuracy")
        axes.legend()
        text = ("Validation accuracy of generation-0 children against sigma, one line per density (mean over the "
                "children of each setting).")
        return [ReportSection("Mutation window", [text], {"mutation_window.png": figure})]
