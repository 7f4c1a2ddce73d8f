"""Stochastic children (Stochastic Subnetwork Annealing): sampling, schedules, fixed end state, runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evo_subens
from evo_subens.core.config import ChildrenConfig, ModelConfig, TuneConfig, config_from_dict
from evo_subens.tasks.classification.data import Split
from evo_subens.errors import ConfigError
from evo_subens.families import decode_genome, make_family
from evo_subens.families.stochastic import SCHEDULES, inclusion_probabilities
from evo_subens.tasks.classification.models import build_model
from evo_subens.tasks.classification.training import SplitTrainer, train

from conftest import TINY, deep_merge, untimed

CNN = ModelConfig(name="cnn2d", kwargs={"channels": [4, 8], "hidden": 16})
SHAPE = (1, 8, 8)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(CNN, SHAPE, 10)


def _children(family: str = "stochastic", **kw) -> ChildrenConfig:
    tune = kw.pop("tune", TuneConfig(epochs=0))
    return ChildrenConfig(family=family, tune=tune, **kw)


def _genome(cfg: ChildrenConfig, index: int = 0, seed: int = 0) -> str:
    family = make_family(cfg)
    return family.propose([family.root("p")], index + 1, np.random.default_rng(seed))[index][1]


def _annealer(cfg: ChildrenConfig, steps: int, genome: str | None = None, model: torch.nn.Module | None = None):
    materialiser = make_family(cfg).bind(model if model is not None else _model())
    genome = genome or _genome(cfg)
    spec = decode_genome(genome)["mask"]
    fraction = cfg.anneal_fraction
    # total steps chosen so that the annealing window is exactly `steps` long
    return materialiser, materialiser.annealer(spec, seed=7, total_steps=round(steps / fraction))


def mask_sequence_hash(steps: int = 40) -> str:
    """Hash of the unit masks of steps 0..steps-1 of a fixed genome (also run in a subprocess)."""
    cfg = _children(mask="random", sparsity=0.9, anneal_schedule="cosine", anneal_start=0.4, anneal_fraction=0.5)
    _, annealer = _annealer(cfg, steps=steps)
    digest = hashlib.sha256()
    for step in range(steps + 2):
        digest.update(annealer.sample_units(step).numpy().tobytes())
    return digest.hexdigest()


def test_empirical_inclusion_frequency_matches_probabilities() -> None:
    """Per unit, the share of steps it is sampled in matches its mean inclusion probability."""
    cfg = _children(mask="random", sparsity=0.7, anneal_schedule="linear", anneal_start=0.3, anneal_fraction=1.0)
    _, annealer = _annealer(cfg, steps=2000)
    steps = range(0, 1200, 3)  # probabilities move from 0.3 to ~0.48 (pruned: ~0.12) over these steps
    counts = torch.stack([annealer.sample_units(s) for s in steps]).double().mean(0)
    expected = torch.stack([annealer.probabilities(s) for s in steps]).double().mean(0)
    n = len(steps)
    sd = (expected * (1 - expected) / n).sqrt()
    assert counts.numel() > 500
    assert ((counts - expected).abs() < 5 * sd + 1e-9).all()
    target = annealer.target
    for kind in (target, ~target):  # class means are much tighter
        gap = (counts[kind].mean() - expected[kind].mean()).abs()
        assert gap < 5 * (sd[kind] ** 2).mean().sqrt() / kind.sum().sqrt()
    # at one step the kept and pruned units follow their own probabilities
    keep, prune = inclusion_probabilities("linear", 0.3, 0.5)
    sample = annealer.sample_units(1000)
    assert abs(sample[target].double().mean() - keep) < 4 * (keep * (1 - keep) / target.sum()).sqrt()
    assert abs(sample[~target].double().mean() - prune) < 4 * (prune * (1 - prune) / (~target).sum()).sqrt()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("start", [0.0, 0.3, 0.9, 1.0])
def test_schedules_are_monotone_and_end_at_the_target(schedule: str, start: float) -> None:
    grid = np.linspace(0, 1, 201)
    keep, prune = np.array([inclusion_probabilities(schedule, start, u) for u in grid]).T
    assert keep[0] == pytest.approx(start) and prune[0] == pytest.approx(start)
    assert keep[-1] == 1.0 and prune[-1] == 0.0  # exactly
    assert np.all(np.diff(keep) >= 0) and np.all(np.diff(prune) <= 0)
    assert np.all((keep >= 0) & (keep <= 1) & (prune >= 0) & (prune <= 1))
    if 0 < start < 1:
        assert np.all(np.diff(keep) > 0) and np.all(np.diff(prune) < 0)  # strictly: every step anneals


def test_schedules_differ_and_masks_reach_the_target_exactly() -> None:
    mid = {s: inclusion_probabilities(s, 0.5, 0.25)[1] for s in SCHEDULES}
    assert mid["exponential"] < mid["linear"] < mid["cosine"]  # fast, even, slow start
    for schedule in SCHEDULES:
        cfg = _children(mask="random", sparsity=0.9, anneal_schedule=schedule, anneal_fraction=0.5)
        materialiser, annealer = _annealer(cfg, steps=50)
        target = materialiser.masks(decode_genome(_genome(cfg))["mask"])
        near_end = annealer.sample(49)
        assert any(not torch.equal(near_end[k], target[k]) for k in target) or schedule == "exponential"
        for step in (50, 51, 99):
            masks = annealer.sample(step)
            assert masks.keys() == target.keys() and all(torch.equal(masks[k], target[k]) for k in target)
        assert not torch.equal(annealer.sample_units(0), annealer.target)


def test_masks_are_a_function_of_genome_and_step() -> None:
    cfg = _children(mask="antirandom", structure="neuron")
    _, a = _annealer(cfg, steps=20, genome=_genome(cfg, 0))
    _, b = _annealer(cfg, steps=20, genome=_genome(cfg, 0))
    _, other = _annealer(cfg, steps=20, genome=_genome(cfg, 1))
    later = [a.sample_units(s) for s in (9, 3, 5)]
    assert all(torch.equal(x, b.sample_units(s)) for x, s in zip(later, (9, 3, 5)))  # order does not matter
    assert not torch.equal(a.sample_units(3), a.sample_units(4))
    assert not torch.equal(a.sample_units(3), other.sample_units(3))
    masks = a.sample(3)
    conv = masks["features.0.weight"].flatten(1)
    assert torch.equal(conv.all(1), conv.any(1))  # neuron structure: a filter is sampled in or out whole


@pytest.mark.slow
def test_same_genome_same_mask_sequence_in_another_process() -> None:
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              "from test_stochastic import mask_sequence_hash; print(mask_sequence_hash())")
    there = subprocess.run([sys.executable, "-c", script], check=True, timeout=120, capture_output=True, text=True)
    assert there.stdout.strip() == mask_sequence_hash()


def _data(n: int = 200) -> Split:
    gen = torch.Generator().manual_seed(0)
    return Split(torch.randn(n, *SHAPE, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def test_gradients_reach_only_sampled_in_entries() -> None:
    """One plain SGD step (no momentum, no decay) moves sampled-in entries only."""
    cfg = _children(mask="random", sparsity=0.5, anneal_start=0.5, anneal_fraction=1.0)
    model = _model()
    _, annealer = _annealer(cfg, steps=100, model=model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    step_cfg = TuneConfig(epochs=1, batch_size=200, lr=0.5, lr_schedule="constant", momentum=0.0, weight_decay=0.0)
    train(model, _data(), step_cfg, seed=0, forward=annealer.forward, parameter_filter=annealer.after_step)
    params = dict(model.named_parameters())
    for name, mask in annealer.sample(0).items():
        moved = params[name] != before[name]
        assert not moved[~mask].any(), name
        assert moved[mask].float().mean() > 0.5, name
    assert not torch.equal(params["classifier.weight"], before["classifier.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_pruned_weights_are_zero_after_annealing_and_stay_zero(optimizer: str) -> None:
    """While annealing, pruned weights are trained when sampled in; from the end of the window on, they
    are exactly zero after every step; the scored child is masked and the parent comes back exactly."""
    tune = TuneConfig(epochs=2, batch_size=20, lr=0.05, optimizer=optimizer, lr_schedule="onecycle", weight_decay=0.0)
    cfg = _children(mask="random", sparsity=0.9, anneal_fraction=0.5, tune=tune)
    model = _model()
    parent = {k: v.clone() for k, v in model.state_dict().items()}
    materialiser = make_family(cfg).bind(model, SplitTrainer(_data()))
    genome = _genome(cfg)
    spec = decode_genome(genome)["mask"]
    masks = materialiser.masks(spec)
    annealer = materialiser.annealer(spec, seed=3, total_steps=20)
    assert annealer.steps == 10
    pruned_zero, pruned_moved = [], []

    def after_step(m: torch.nn.Module) -> None:
        annealer.after_step(m)
        params = dict(m.named_parameters())
        pruned_zero.append(all(bool((params[k][~v] == 0).all()) for k, v in masks.items()))
        pruned_moved.append(any(bool((params[k][~v] != parent[k][~v]).any()) for k, v in masks.items()))

    train(model, _data(), tune, seed=3, forward=annealer.forward, parameter_filter=after_step)
    assert len(pruned_zero) == 20
    assert not any(pruned_zero[:10]) and all(pruned_zero[10:])
    assert pruned_moved[9]  # sampled-in pruned weights were trained during annealing
    model.load_state_dict(parent)

    with materialiser.materialised(genome):  # the materialiser's own tuning ends with the target mask
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            assert torch.all(params[name][~mask] == 0), name
            assert not torch.equal(params[name][mask], parent[name][mask]), f"{name} was not tuned"
    assert all(torch.equal(v, parent[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_zero_annealing_fraction_is_one_shot_pruning() -> None:
    """anneal_fraction 0: the exact mask from the first step, the same child as the sparse family's."""
    tune = TuneConfig(epochs=1, batch_size=50, lr=0.05)
    children = {}
    for family in ("sparse", "stochastic"):
        model = _model()
        anneal = {"anneal_fraction": 0.0} if family == "stochastic" else {}
        cfg = _children(family, mask="random", sparsity=0.8, tune=tune, **anneal)
        with make_family(cfg).bind(model, SplitTrainer(_data())).materialised(_genome(cfg)):
            children[family] = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(children["sparse"][k], children["stochastic"][k]) for k in children["sparse"])
    model = _model()
    cfg = _children(mask="random", sparsity=0.8, anneal_fraction=0.5, tune=tune)
    with make_family(cfg).bind(model, SplitTrainer(_data())).materialised(_genome(cfg)):
        assert not torch.equal(model.state_dict()["features.0.weight"], children["sparse"]["features.0.weight"])


def test_config_checks() -> None:
    base = deep_merge(dict(TINY, children={}), {"output_dir": "/tmp/unused", "children": {"family": "stochastic"}})
    cfg = config_from_dict(deep_merge(base, {"children": {"anneal_schedule": "exponential"}}))
    assert cfg.children.family == "stochastic" and cfg.children.tune.epochs == 1
    bad = [({"children": {"tune": {"epochs": 0}}}, "children.tune.epochs"),
           ({"children": {"anneal_schedule": "step"}}, "children.anneal_schedule"),
           ({"children": {"anneal_start": 1.5}}, "children.anneal_start"),
           ({"children": {"anneal_fraction": -0.1}}, "children.anneal_fraction"),
           ({"children": {"mask": "antirandom", "sparsity": 0.9}}, "children.sparsity"),
           ({"children": {"mask": "partition", "partition_overlap": 8}}, "children.partition_overlap")]
    for extra, field in bad:
        with pytest.raises(ConfigError) as info:
            config_from_dict(deep_merge(base, extra))
        assert info.value.field == field


RUN = deep_merge(dict(TINY, children={}),
                 {"children": {"family": "stochastic", "mask": "random", "sparsity": 0.6, "anneal_schedule": "linear",
                               "tune": {"epochs": 1, "lr": 0.05}},
                  "search": {"population": 4, "generations": 1, "elites": 2},
                  "ensemble": {"size": 3}})


def _run(tmp_path: Path, name: str, extra: dict | None = None) -> evo_subens.RunResult:
    config = deep_merge(RUN, dict(extra or {}, output_dir=str(tmp_path), name=name))
    return evo_subens.run(config, progress=lambda line: None)


@pytest.mark.ray
@pytest.mark.slow
def test_stochastic_run_end_to_end(ray_session, tmp_path: Path) -> None:
    """A tiny run in-process and in Ray actors: same members and metrics; members are stored packed and
    masked; they are not the one-shot (sparse) children with the same masks."""
    local = _run(tmp_path, "local")
    remote = _run(tmp_path, "ray", {"workers": {"executor": "ray", "num_actors": 2}})
    sparse_children = {k: v for k, v in RUN["children"].items() if not k.startswith("anneal_")}
    sparse = evo_subens.run(dict(RUN, children=dict(sparse_children, family="sparse"), output_dir=str(tmp_path),
                                 name="sparse"), progress=lambda line: None)
    assert untimed(local.metrics) == untimed(remote.metrics)
    assert local.population.loc[local.population["generation"] >= 0, "density"].eq(0.4).all()
    members = json.loads((local.run_dir / "members.json").read_text())
    sparse_members = json.loads((sparse.run_dir / "members.json").read_text())
    cfg = evo_subens.load_config(local.run_dir / "config.yaml")
    family = make_family(cfg.children)
    materialiser = family.bind(build_model(cfg.model, SHAPE, 10))
    by_mask = {json.dumps(decode_genome(m["genome"])["mask"]): i for i, m in enumerate(sparse_members)}
    compared = 0
    for i, member in enumerate(members):
        assert decode_genome(member["genome"])["space"]["anneal"] == {"schedule": "linear", "start": 0.5,
                                                                      "fraction": 0.5}
        packed = torch.load(local.run_dir / member["weights"], weights_only=True)
        assert packed == {} or all(torch.equal(v, torch.load(remote.run_dir / member["weights"],
                                                             weights_only=True)[k]) for k, v in packed.items())
        state = family.unpack(packed, member["genome"], materialiser)
        for name, mask in materialiser.masks(decode_genome(member["genome"])["mask"]).items():
            assert torch.all(state[name][~mask] == 0), name
        j = by_mask.get(json.dumps(decode_genome(member["genome"])["mask"]))
        if j is not None:  # same target mask, same tuning seed: only the annealing differs
            other = torch.load(sparse.run_dir / sparse_members[j]["weights"], weights_only=True)
            assert not all(torch.equal(packed[k], other[k]) for k in packed)
            compared += 1
    assert compared >= 1


@pytest.mark.slow
def test_extended_stochastic_search_equals_a_longer_run(tmp_path: Path) -> None:
    """Resume with more generations gives the run configured with them (members re-tuned deterministically)."""
    short = _run(tmp_path, "short")
    longer = _run(tmp_path, "long", {"search": {"generations": 2}})
    extended = evo_subens.resume(short.run_dir, ["search.generations=2"], progress=lambda line: None)
    assert untimed(extended.metrics) == untimed(longer.metrics)
    a = json.loads((extended.run_dir / "members.json").read_text())
    b = json.loads((longer.run_dir / "members.json").read_text())
    assert [m["genome"] for m in a] == [m["genome"] for m in b]
