"""Sparse children (Prune and Tune Ensembles): the parent times a binary mask, tuned with the mask fixed.

Masks are random, not by magnitude, over the prunable units: single weights (``connection``) or whole
output units of Linear/Conv layers (``neuron``: the filter's weights and its bias), drawn over all
layers at once (``global``) or per layer (``layerwise``). The final classifier is never pruned.

- ``random``: each child keeps a random ``1 - sparsity`` share of the units;
- ``antirandom``: children come in pairs with complementary masks M and 1 - M (sparsity 0.5);
- ``partition`` (Neural Partitioning): a generation's N children share out the units, every unit kept
  by exactly ``partition_overlap`` (k) of them (k = 1: disjoint 1/N shares covering the parent).

A genome names the mask (``seed`` + pair side or partition index), so any process rebuilds it. Scoring a
child tunes it first (``children.tune``, with the task's :class:`~evo_subens.families.base.ChildTrainer`);
pruned weights stay exactly zero, the mask is re-applied after every optimiser step. Children always
derive from the trained parent (a mask of a mask would only prune more), so later generations draw fresh
masks.

Config (``children:`` with ``family: sparse``): :class:`SparseConfig`. Population-log columns: ``seed``
(the mask's seed, shared by a generation's partition children and by an anti-random pair), ``part`` (the
partition index, or the pair side 0 = M, 1 = 1 - M; 0 for random masks) and ``density`` (the share of
prunable units kept). Logs written before these columns kept ``part`` in ``mask_seed``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.config import BAGGING_SHARE, ChildrenConfig, RunConfig, TuneConfig
from ..core.options import option
from ..errors import ConfigError
from ..nn import output_parameter_names
from .base import ChildTrainer, Family, Materialiser, Undo, check_patterns, decode_genome, encode_genome
from .noisy import SEED_BOUND

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class SparseConfig(ChildrenConfig):
    """``children`` of the sparse family."""

    family: str = "sparse"
    layers: list = option(["*"], "glob patterns over parameter names (e.g. 'features.*') selecting the Linear/Conv "
                                 "weights masks may prune (never the output layer's)")
    mask: str = option("random", "random masks, antirandom pairs (M, 1-M at sparsity 0.5), or partition (each "
                                 "generation's children share out the parent)",
                       choices=("random", "antirandom", "partition"))
    sparsity: float = option(0.5, "random: fraction of the prunable units removed; partition: derived as "
                                  "1 - partition_overlap / search.population", ge=0, le=0.999)
    structure: str = option("connection", "prune single weights (connection) or whole output units of "
                                          "Linear/Conv layers (neuron)", choices=("connection", "neuron"))
    scope: str = option("global", "draw masks over all prunable units at once (global) or per layer at the "
                                  "same sparsity (layerwise)", choices=("global", "layerwise"))
    partition_overlap: int = option(1, "partition: every prunable unit is kept by exactly this many of a "
                                       "generation's children", ge=1)
    tune: TuneConfig = field(default_factory=TuneConfig, metadata={"doc": "tuning of each child, its mask "
                                                                          "fixed, before it is scored"})

    def check(self, run: RunConfig) -> None:
        super().check(run)
        check_patterns("children.layers", self.layers)
        population = run.search.population
        if self.mask == "antirandom":
            if self.sparsity != 0.5:
                raise ConfigError("children.sparsity", "0.5 for antirandom masks (M and 1 - M)", self.sparsity)
            if population % 2:
                raise ConfigError("search.population", "an even number for antirandom pairs", population)
        if self.mask == "partition" and self.partition_overlap >= population:
            raise ConfigError("children.partition_overlap", f"less than search.population = {population}",
                              self.partition_overlap)

    def tuning(self) -> TuneConfig:
        return self.tune


@dataclass(frozen=True)
class PrunableLayer:
    """A Linear/Conv layer whose weights (and, for neuron pruning, biases) masks act on."""

    weight: str
    bias: str | None
    shape: tuple[int, ...]


def prunable_layers(model: nn.Module, patterns: Sequence[str]) -> list[PrunableLayer]:
    """The layers masks may prune: Linear/Conv layers matching ``patterns``, never the classifier."""
    classifier = set(output_parameter_names(model))
    layers = []
    for name, module in model.named_modules():
        weight = f"{name}.weight" if name else "weight"
        if not isinstance(module, PRUNABLE_TYPES) or weight in classifier:
            continue
        if any(fnmatch.fnmatchcase(weight, p) for p in patterns):
            bias = f"{name}.bias" if module.bias is not None else None
            layers.append(PrunableLayer(weight, bias, tuple(module.weight.shape)))
    if not layers:
        raise ConfigError("children.layers", "patterns matching the weight of at least one Linear/Conv layer "
                                             "other than the classifier", list(patterns))
    return layers


def _keep_units(spec: dict, count: int, seed: list[int]) -> np.ndarray:
    """Boolean keep-vector over ``count`` units for one mask ``spec``."""
    rng = np.random.default_rng(seed)
    keep = np.zeros(count, dtype=bool)
    if spec["kind"] == "random":
        keep[rng.choice(count, count - round(spec["sparsity"] * count), replace=False)] = True
    elif spec["kind"] == "antirandom":
        keep[rng.choice(count, count // 2, replace=False)] = True
        if spec["complement"]:
            keep = ~keep
    else:  # partition: a random balanced assignment of units to parts, then a window of k parts
        parts = spec["parts"]
        part = np.empty(count, dtype=np.int64)
        part[rng.permutation(count)] = np.arange(count) % parts
        keep = (part - spec["index"]) % parts < spec["overlap"]
    return keep


def unit_masks(spec: dict, counts: list[int], scope: str) -> list[np.ndarray]:
    """Keep-vectors per layer; global masks are drawn once over all units, layerwise ones per layer."""
    if scope == "layerwise":
        return [_keep_units(spec, n, [spec["seed"], layer]) for layer, n in enumerate(counts)]
    keep = _keep_units(spec, sum(counts), [spec["seed"]])
    return np.split(keep, np.cumsum(counts)[:-1])


def tune_seed(spec: dict) -> int:
    """Seed of a child's tuning (batch order, bagging subset), distinct for each side and partition."""
    salt = spec.get("index", 0) if spec["kind"] == "partition" else int(spec.get("complement", False))
    return int(np.random.default_rng([spec["seed"], salt, 1]).integers(SEED_BOUND))


class SparseMaterialiser(Materialiser):
    """Writes tuned sparse children into a model; ``undo`` copies the parent's weights back."""

    family = "sparse"  # the genome family this materialiser accepts

    def __init__(self, model: nn.Module, space: dict[str, Any], tune: TuneConfig,
                 trainer: ChildTrainer | None = None):
        self.model = model
        self.space = space
        self.tune = tune
        self.trainer = trainer
        self.layers = prunable_layers(model, space["layers"])
        self.parent = {k: v.detach().clone() for k, v in model.state_dict().items()}  # on the model's device

    def unit_counts(self) -> list[int]:
        """Prunable units per layer: output units (neuron structure) or single weights (connection)."""
        neuron = self.space["structure"] == "neuron"
        return [layer.shape[0] if neuron else int(np.prod(layer.shape)) for layer in self.layers]

    def masks(self, spec: dict) -> dict[str, torch.Tensor]:
        """Boolean masks (parameter-shaped) of the pruned parameters for a mask ``spec``."""
        device = next(self.model.parameters()).device
        keeps = unit_masks(spec, self.unit_counts(), self.space["scope"])
        return self.expand([torch.from_numpy(keep).to(device) for keep in keeps])

    def expand(self, keeps: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameter-shaped masks (views, no copies) from per-layer boolean keep-vectors over units."""
        neuron = self.space["structure"] == "neuron"
        masks = {}
        for layer, keep in zip(self.layers, keeps):
            if neuron:
                masks[layer.weight] = keep.view(-1, *([1] * (len(layer.shape) - 1))).expand(layer.shape)
                if layer.bias is not None:
                    masks[layer.bias] = keep
            else:
                masks[layer.weight] = keep.view(layer.shape)
        return masks

    def constraint(self, genome: str) -> Callable[[nn.Module], None]:
        """A callable that zeroes ``genome``'s pruned weights of a model (run after each optimiser step)."""
        return self._zeroing(self.masks(decode_genome(genome)["mask"]))

    @staticmethod
    def _zeroing(masks: dict[str, torch.Tensor]) -> Callable[[nn.Module], None]:
        @torch.no_grad()
        def apply_mask(model: nn.Module) -> None:
            params = dict(model.named_parameters())
            for name, mask in masks.items():
                params[name].mul_(mask)

        return apply_mask

    def apply(self, genome: str) -> Undo:
        spec = decode_genome(genome)
        if spec.get("family") != self.family or spec.get("space") != self.space:
            raise ValueError(f"genome does not belong to this {self.family} space: {genome[:200]}")

        @torch.no_grad()
        def undo() -> None:
            self.model.load_state_dict(self.parent)

        if spec["mask"] is None:
            return undo
        apply_mask = self._zeroing(self.masks(spec["mask"]))
        if self.tune.epochs > 0 and self.trainer is not None:
            seed = tune_seed(spec["mask"])
            subset = None
            if self.tune.bagging:
                samples = len(self.trainer)
                rng = np.random.default_rng([seed, 2])
                subset = np.sort(rng.choice(samples, round(BAGGING_SHARE * samples), replace=False))
            torch.manual_seed(seed)
            self.tune_child(spec["mask"], subset, seed, apply_mask)
        apply_mask(self.model)  # the child scored and stored is the parent under its final, fixed mask
        return undo

    def tune_child(self, mask: dict, subset: np.ndarray | None, seed: int,
                   apply_mask: Callable[[nn.Module], None]) -> None:
        """Tune the child in place (on the training samples ``subset``, None: all of them): pruned from the
        start, the mask re-applied after every optimiser step."""
        apply_mask(self.model)
        self.trainer.train(self.model, self.tune, seed=seed, parameter_filter=apply_mask, subset=subset)


class SparseFamily(Family):
    """Pruned children of the trained parent, tuned with their masks fixed."""

    name = "sparse"
    config = SparseConfig
    log_columns = {
        "seed": "int64",       # the mask's seed; -1: the trained parent
        "part": "int64",       # partition index, or anti-random pair side (0: M, 1: 1 - M); 0 for random masks
        "density": "float64",  # share of the prunable units kept
    }
    legacy_log_columns = {"mask_seed": "part"}
    trains_children = True

    def __init__(self, cfg: SparseConfig):
        super().__init__(cfg)
        self.space = {"layers": list(cfg.layers), "structure": cfg.structure, "scope": cfg.scope}

    def root(self, parent_id: str) -> str:
        return encode_genome({"family": self.name, "parent": parent_id, "space": self.space, "mask": None})

    def _spec(self, i: int, count: int, seeds: list[int]) -> dict:
        kind = self.cfg.mask
        if kind == "random":
            return {"kind": kind, "seed": seeds[i], "sparsity": self.cfg.sparsity}
        if kind == "antirandom":
            return {"kind": kind, "seed": seeds[i // 2], "complement": bool(i % 2)}
        return {"kind": kind, "seed": seeds[0], "index": i, "parts": count, "overlap": self.cfg.partition_overlap}

    def propose(self, parents: Sequence[str], count: int, rng: np.random.Generator, *,
                step_scale: float | Sequence[float] = 1.0) -> list[tuple[int, str]]:
        seeds = [int(s) for s in rng.integers(SEED_BOUND, size=count)]
        root = decode_genome(self.root(decode_genome(parents[0])["parent"]))
        return [(-1, encode_genome(dict(root, mask=self._spec(i, count, seeds)))) for i in range(count)]

    def bind(self, model: nn.Module, trainer: ChildTrainer | None = None) -> SparseMaterialiser:
        return SparseMaterialiser(model, self.space, self.cfg.tune, trainer)

    def constraint(self, genome: str, materialiser: SparseMaterialiser) -> Callable[[nn.Module], None]:
        return materialiser.constraint(genome)

    def describe(self, genome: str) -> dict[str, Any]:
        mask = decode_genome(genome)["mask"]
        if mask is None:
            return {"seed": -1, "part": -1, "density": 1.0}
        if mask["kind"] == "partition":
            kept = mask["overlap"] / mask["parts"]
        else:
            kept = 0.5 if mask["kind"] == "antirandom" else 1 - mask["sparsity"]
        part = mask.get("index", int(mask.get("complement", False)))
        return {"seed": mask["seed"], "part": part, "density": kept}

    def summary(self) -> str:
        return f"mask {self.cfg.mask}, sparsity {self.cfg.sparsity}, tuned {self.cfg.tune.epochs} epoch(s)"

    def settings(self, row: Mapping[str, Any]) -> str:
        return f"density {row['density']:g}"

    def divergence_advice(self) -> str:
        return "a smaller children.tune.lr"

    def pack(self, state: dict[str, torch.Tensor], genome: str, materialiser: SparseMaterialiser) -> dict:
        """A compact copy of a member's weights: only the kept entries of pruned parameters (the unpruned
        parent, a member under tuned scoring, as it is)."""
        spec = decode_genome(genome)["mask"]
        if spec is None:
            return state
        masks = materialiser.masks(spec)
        return {name: (value[masks[name].cpu()] if name in masks else value) for name, value in state.items()}

    def unpack(self, packed: dict, genome: str, materialiser: SparseMaterialiser) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`pack` (pruned entries are zeros)."""
        spec = decode_genome(genome)["mask"]
        if spec is None:
            return packed
        masks = materialiser.masks(spec)
        state = {}
        for name, value in packed.items():
            if name in masks:
                full = torch.zeros(masks[name].shape, dtype=value.dtype)
                full[masks[name].cpu()] = value
                value = full
            state[name] = value
        return state
