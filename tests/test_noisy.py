"""Noisy child family: genomes materialise deterministically, restore the parent exactly, and perturb
exactly the eligible parameters with the configured density and scale."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evo_subens.core.config import ChildrenConfig, ModelConfig
from evo_subens.errors import ConfigError
from evo_subens.core.worker import parent_fingerprint
from evo_subens.tasks.classification.evaluation import CandidateEvaluator, EvaluationPayload
from evo_subens.families import decode_genome, make_family
from evo_subens.tasks.classification.models import build_model

MODEL = ModelConfig(name="mlp", kwargs={"hidden": [32]})
SHAPE = (1, 8, 8)
CLASSES = 10
PARAM_SIZES = {"features.1.weight": 64 * 32, "features.1.bias": 32,
               "classifier.weight": 32 * 10, "classifier.bias": 10}
PARENT_ID = "0123456789abcdef"


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(MODEL, SHAPE, CLASSES)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def lineage(family, depth: int, seed: int = 0, parent_id: str = PARENT_ID) -> list[str]:
    """Genomes of a chain root -> child -> grandchild ..., ``depth`` mutation steps long."""
    rng = np.random.default_rng(seed)
    genomes = [family.root(parent_id)]
    for _ in range(depth):
        genomes.append(family.propose([genomes[-1]], 1, rng)[0][1])
    return genomes


def child_of(family, model, genome: str) -> dict[str, torch.Tensor]:
    materialiser = family.bind(model)
    with materialiser.materialised(genome):
        return snapshot(model)


@pytest.mark.parametrize("density", [0.1, 1.0], ids=["sparse", "dense"])
@pytest.mark.parametrize("sigma_mode", ["absolute", "relative"])
def test_materialise_is_deterministic_and_restores_parent(density: float, sigma_mode: str) -> None:
    """A 3-step genome gives the same weights every time and the parent comes back bit for bit."""
    family = make_family(ChildrenConfig(density=density, sigma=0.3, sigma_mode=sigma_mode))
    model = make_model()
    parent = snapshot(model)
    materialiser = family.bind(model)
    assert same(snapshot(model), parent), "binding must not change the weights"

    chain = lineage(family, 3)
    genome, other = chain[-1], lineage(family, 3, seed=1)[-1]
    assert len(decode_genome(genome)["steps"]) == 3

    with materialiser.materialised(genome):
        first = snapshot(model)
    assert not same(first, parent)
    assert same(snapshot(model), parent)

    with materialiser.materialised(other):
        assert not same(snapshot(model), first)
    assert same(snapshot(model), parent)

    with materialiser.materialised(genome):
        assert same(snapshot(model), first)
    assert same(snapshot(model), parent)

    # A fresh model and materialiser give the same child: nothing depends on earlier calls.
    assert same(child_of(family, make_model(), genome), first)
    # Steps compound: the 2-step ancestor is a different network.
    assert not same(child_of(family, make_model(), chain[2]), first)


def test_parent_restored_when_the_body_raises() -> None:
    """An error while the child is materialised still restores the parent."""
    family = make_family(ChildrenConfig(density=0.2, sigma=0.5))
    model = make_model()
    parent = snapshot(model)
    materialiser = family.bind(model)
    with pytest.raises(RuntimeError, match="boom"):
        with materialiser.materialised(lineage(family, 2)[-1]):
            raise RuntimeError("boom")
    assert same(snapshot(model), parent)


CHILD_SCRIPT = """
import json, sys, torch
from evo_subens.core.config import ChildrenConfig, ModelConfig
from evo_subens.families import make_family
from evo_subens.tasks.classification.models import build_model
spec = json.load(open(sys.argv[1]))
model = build_model(ModelConfig(**spec["model"]), tuple(spec["shape"]), spec["classes"])
model.load_state_dict(torch.load(spec["parent"], weights_only=True))
family = make_family(ChildrenConfig(**spec["children"]))
with family.bind(model).materialised(spec["genome"]):
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, spec["out"])
"""


@pytest.mark.slow
def test_same_genome_in_another_process(tmp_path: Path) -> None:
    """A genome materialised in a separate Python process gives bitwise-identical weights."""
    children = {"density": 0.1, "sigma": 0.5, "sigma_mode": "relative", "layers": ["*"],
                "include_classifier": True}
    family = make_family(ChildrenConfig(**children))
    model = make_model(seed=3)
    torch.save(snapshot(model), tmp_path / "parent.pt")
    genome = lineage(family, 3, seed=7)[-1]
    expected = child_of(family, model, genome)

    spec = {"model": {"name": MODEL.name, "kwargs": MODEL.kwargs}, "shape": SHAPE, "classes": CLASSES,
            "parent": str(tmp_path / "parent.pt"), "children": children, "genome": genome,
            "out": str(tmp_path / "child.pt")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-c", CHILD_SCRIPT, str(tmp_path / "spec.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    theirs = torch.load(tmp_path / "child.pt", weights_only=True)
    assert same(theirs, expected)


ELIGIBILITY = [
    pytest.param(["*"], True, set(PARAM_SIZES), id="all"),
    pytest.param(["classifier.*"], True, {"classifier.weight", "classifier.bias"}, id="classifier-only"),
    pytest.param(["*"], False, {"features.1.weight", "features.1.bias"}, id="exclude-classifier"),
    pytest.param(["*.weight"], True, {"features.1.weight", "classifier.weight"}, id="weights-only"),
]


@pytest.mark.parametrize("layers,include_classifier,eligible", ELIGIBILITY)
def test_sparse_step_changes_exactly_density_of_eligible(layers, include_classifier, eligible) -> None:
    """One sparse step changes round(density * eligible) entries, all inside eligible parameters."""
    density = 0.1
    family = make_family(ChildrenConfig(density=density, sigma=0.1, sigma_mode="absolute", layers=layers,
                                        include_classifier=include_classifier))
    model = make_model()
    parent = snapshot(model)
    child = child_of(family, model, lineage(family, 1)[-1])
    changed = {name: int((child[name] != parent[name]).sum()) for name in parent}
    touched = {name for name, n in changed.items() if n}
    assert touched <= eligible
    assert sum(changed.values()) == round(density * sum(PARAM_SIZES[n] for n in eligible))


@pytest.mark.parametrize("include_classifier", [True, False])
def test_dense_step_changes_every_eligible_entry(include_classifier: bool) -> None:
    """density=1.0 perturbs every eligible entry and nothing else."""
    family = make_family(ChildrenConfig(density=1.0, sigma=0.1, sigma_mode="absolute",
                                        include_classifier=include_classifier))
    model = make_model()
    parent = snapshot(model)
    child = child_of(family, model, lineage(family, 1)[-1])
    for name in parent:
        is_classifier = name.startswith("classifier.")
        if is_classifier and not include_classifier:
            assert torch.equal(child[name], parent[name]), name
        else:
            assert bool((child[name] != parent[name]).all()), name


def _changed_positions(family, genomes: list[str]) -> list[torch.Tensor]:
    model = make_model()
    parent = snapshot(model)
    materialiser = family.bind(model)
    masks = []
    for genome in genomes:
        with materialiser.materialised(genome):
            masks.append(torch.cat([(model.state_dict()[k] != parent[k]).flatten() for k in parent]))
    return masks


def test_static_subspace_shares_one_mask_per_generation() -> None:
    """subspace=static: every child of a generation perturbs the same positions (with different noise)."""
    family = make_family(ChildrenConfig(density=0.1, sigma=0.1, sigma_mode="absolute", subspace="static"))
    rng = np.random.default_rng(0)
    genomes = [g for _, g in family.propose([family.root(PARENT_ID)], 4, rng)]
    masks = _changed_positions(family, genomes)
    assert all(torch.equal(m, masks[0]) for m in masks[1:])
    assert len(set(genomes)) == 4, "children of a static generation still differ in their noise"
    # The next generation draws a new shared mask.
    next_gen = [g for _, g in family.propose(genomes[:2], 4, rng)]
    seeds = {family.describe(g)["mask_seed"] for g in next_gen}
    assert len(seeds) == 1 and seeds != {family.describe(genomes[0])["mask_seed"]}


def test_dynamic_subspace_draws_a_mask_per_child() -> None:
    """subspace=dynamic: children of one generation perturb different positions."""
    family = make_family(ChildrenConfig(density=0.1, sigma=0.1, sigma_mode="absolute", subspace="dynamic"))
    genomes = [g for _, g in family.propose([family.root(PARENT_ID)], 4, np.random.default_rng(0))]
    masks = _changed_positions(family, genomes)
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert not torch.equal(masks[i], masks[j])


@pytest.mark.parametrize("density", [1.0, 0.5], ids=["dense", "sparse"])
def test_relative_sigma_scales_with_layer_std(density: float) -> None:
    """sigma_mode=relative: the noise std on each layer is sigma times that layer's weight std."""
    sigma = 0.5
    family = make_family(ChildrenConfig(density=density, sigma=sigma, sigma_mode="relative"))
    model = make_model()
    with torch.no_grad():
        model.features[1].weight.mul_(20.0)  # make the layers' scales very different
    parent = snapshot(model)
    child = child_of(family, model, lineage(family, 1)[-1])
    for name in ("features.1.weight", "classifier.weight"):
        delta = (child[name] - parent[name]).double()
        delta = delta[delta != 0]
        ratio = delta.std().item() / parent[name].double().std(unbiased=False).item()
        assert ratio == pytest.approx(sigma, rel=0.2), name


def test_absolute_sigma_ignores_layer_std() -> None:
    """sigma_mode=absolute: the noise std is sigma on every layer, whatever its scale."""
    sigma = 0.05
    family = make_family(ChildrenConfig(density=1.0, sigma=sigma, sigma_mode="absolute"))
    model = make_model()
    with torch.no_grad():
        model.features[1].weight.mul_(20.0)
    parent = snapshot(model)
    child = child_of(family, model, lineage(family, 1)[-1])
    for name in ("features.1.weight", "classifier.weight"):
        assert (child[name] - parent[name]).double().std().item() == pytest.approx(sigma, rel=0.2), name


@pytest.mark.parametrize("layers,include_classifier", [(["nomatch.*"], True), (["classifier.*"], False)])
def test_layers_matching_nothing_is_a_config_error(layers, include_classifier) -> None:
    """Patterns that select no parameter raise ConfigError on 'children.layers', listing the names."""
    family = make_family(ChildrenConfig(layers=layers, include_classifier=include_classifier))
    with pytest.raises(ConfigError) as info:
        family.bind(make_model())
    assert info.value.field == "children.layers"
    assert "features.1.weight" in str(info.value)


def _payload(model: torch.nn.Module, children: ChildrenConfig) -> EvaluationPayload:
    state = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    return EvaluationPayload(model=MODEL, input_shape=SHAPE, num_classes=CLASSES, parent_state=state,
                             parent_id=parent_fingerprint(state), children=children,
                             val_x=torch.rand(50, *SHAPE, generator=gen),
                             val_y=torch.randint(0, CLASSES, (50,), generator=gen), batch_size=16, threads=1)


def test_evaluator_refuses_genome_of_another_parent() -> None:
    """CandidateEvaluator rejects genomes derived from a different parent's weights."""
    children = ChildrenConfig(density=0.2, sigma=0.5)
    payload = _payload(make_model(), children)
    evaluator = CandidateEvaluator(payload)
    family = make_family(children)
    evaluator.evaluate(lineage(family, 1, parent_id=payload.parent_id)[-1])  # its own parent: fine
    foreign_id = parent_fingerprint(snapshot(make_model(seed=1)))
    assert foreign_id != payload.parent_id
    foreign = lineage(family, 1, parent_id=foreign_id)[-1]
    with pytest.raises(ValueError, match="another parent"):
        evaluator.evaluate(foreign)
    with pytest.raises(ValueError, match="another parent"):
        evaluator.child_state(foreign)


def test_evaluator_scores_root_as_the_parent() -> None:
    """The root genome scores exactly like the parent; scoring a child leaves the parent intact."""
    children = ChildrenConfig(density=0.2, sigma=0.5)
    model = make_model()
    payload = _payload(model, children)
    evaluator = CandidateEvaluator(payload)
    with torch.no_grad():
        logits = model(payload.val_x)
    expected_acc = (logits.argmax(1) == payload.val_y).double().mean().item()
    expected_nll = torch.nn.functional.cross_entropy(logits.double(), payload.val_y).item()
    family = make_family(children)
    evaluator.evaluate(lineage(family, 2, parent_id=payload.parent_id)[-1])
    score = evaluator.evaluate(family.root(payload.parent_id))
    assert score.values[0] == expected_acc
    assert score.values[1] == pytest.approx(expected_nll, abs=1e-5)
    assert same(snapshot(evaluator.model), payload.parent_state)


def test_parent_fingerprint_identifies_weights() -> None:
    """The parent id is a stable 16-hex-digit hash that changes when any weight changes."""
    state = snapshot(make_model())
    fingerprint = parent_fingerprint(state)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert parent_fingerprint({k: v.clone() for k, v in state.items()}) == fingerprint
    state["classifier.bias"][0] += 1e-6
    assert parent_fingerprint(state) != fingerprint


def test_parent_fingerprint_of_model_with_scalar_buffers() -> None:
    """Parents with 0-dim tensors (BatchNorm's num_batches_tracked, scalar parameters) get an id too."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 10))
    state = model.state_dict()
    assert state["2.num_batches_tracked"].dim() == 0
    fingerprint = parent_fingerprint(state)
    state["2.num_batches_tracked"] += 1
    assert parent_fingerprint(state) != fingerprint


@pytest.mark.slow
def test_grid_sweep_logs_its_grid_point(tmp_path: Path) -> None:
    """A density x sigma sweep whose step size adapts: the log's sigma is the scaled one, and grid_sigma
    names the grid point each candidate came from, so a sweep groups into its cells (also in load_runs and
    in logs written before the column, where it is filled in)."""
    import pandas as pd

    import evo_subens
    from conftest import TINY, deep_merge

    grid = {"density_grid": [1.0, 0.1], "sigma_grid": [0.1, 0.3]}
    config = deep_merge(TINY, {"output_dir": str(tmp_path), "name": "sweep", "children": grid,
                               "search": {"generations": 3, "step_size": "one_fifth"}})
    result = evo_subens.run(config, progress=lambda line: None)
    pop = result.population[result.population["generation"] >= 0]
    assert (pop["step_scale"] != 1.0).any()  # the search scaled some steps
    assert set(pop["grid_sigma"]) == {0.1, 0.3}
    np.testing.assert_allclose(pop["sigma"], pop["grid_sigma"] * pop["step_scale"], rtol=1e-12)
    cells = evo_subens.load_runs(tmp_path).query("generation >= 0").groupby(["density", "grid_sigma"]).size()
    assert cells.index.tolist() == [(0.1, 0.1), (0.1, 0.3), (1.0, 0.1), (1.0, 0.3)]
    old = pd.read_parquet(result.run_dir / "population.parquet").drop(columns=["grid_sigma"])
    old.to_parquet(result.run_dir / "population.parquet", index=False)
    filled = evo_subens.load_population(result.run_dir)
    np.testing.assert_allclose(filled["grid_sigma"], result.population["grid_sigma"], rtol=1e-12)
