"""Sparse children (Prune and Tune, Neural Partitioning): masks, tuning with masks fixed, storage, runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evo_subens
from evo_subens.core.config import ChildrenConfig, TuneConfig, config_from_dict
from evo_subens.tasks.classification.data import Split
from evo_subens.tasks.classification.training import SplitTrainer
from evo_subens.errors import ConfigError
from evo_subens.families import decode_genome, make_family
from evo_subens.families.sparse import unit_masks
from evo_subens.tasks.classification.models import build_model
from evo_subens.core.config import ModelConfig

from conftest import TINY, deep_merge, untimed

CNN = ModelConfig(name="cnn2d", kwargs={"channels": [4, 8], "hidden": 16})
SHAPE = (1, 8, 8)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(CNN, SHAPE, 10)


def _children(**kw) -> ChildrenConfig:
    return ChildrenConfig(family="sparse", tune=TuneConfig(epochs=0), **kw)


def _genomes(cfg: ChildrenConfig, count: int, seed: int = 0) -> list[str]:
    family = make_family(cfg)
    return [g for _, g in family.propose([family.root("p")], count, np.random.default_rng(seed))]


def _masks(cfg: ChildrenConfig, genomes: list[str]) -> list[dict[str, torch.Tensor]]:
    materialiser = make_family(cfg).bind(_model())
    return [materialiser.masks(decode_genome(g)["mask"]) for g in genomes]


@pytest.mark.parametrize("structure", ["connection", "neuron"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("overlap", [1, 2])
def test_partition_covers_every_unit_exactly_overlap_times(structure: str, scope: str, overlap: int) -> None:
    """N partition children: each prunable parameter is kept by exactly k of them (k=1: disjoint, covering)."""
    cfg = _children(mask="partition", structure=structure, scope=scope, partition_overlap=overlap)
    masks = _masks(cfg, _genomes(cfg, 4))
    assert set(masks[0]) >= {"features.0.weight", "features.3.weight", "head.1.weight"}
    for name in masks[0]:
        kept_by = sum(m[name].long() for m in masks)
        assert torch.equal(kept_by, torch.full_like(kept_by, overlap)), name
    total = sum(m.numel() for m in masks[0].values())
    kept = [sum(int(m[n].sum()) for n in m) for m in masks]
    assert abs(sum(kept) / (4 * total) - overlap / 4) < 1e-9  # every unit counted exactly k times
    assert all(abs(k / total - overlap / 4) < 0.1 for k in kept)  # shares are balanced


@pytest.mark.parametrize("structure", ["connection", "neuron"])
def test_antirandom_pairs_are_complementary(structure: str) -> None:
    cfg = _children(mask="antirandom", structure=structure)
    masks = _masks(cfg, _genomes(cfg, 4))
    for a, b in ((masks[0], masks[1]), (masks[2], masks[3])):
        for name in a:
            assert torch.equal(a[name], ~b[name]), name
    assert not torch.equal(masks[0]["features.0.weight"], masks[2]["features.0.weight"])


def test_random_mask_keeps_exact_share() -> None:
    counts = [100, 37, 250]
    for scope in ("global", "layerwise"):
        keep = unit_masks({"kind": "random", "seed": 3, "sparsity": 0.8}, counts, scope)
        if scope == "layerwise":
            assert [int(k.sum()) for k in keep] == [20, 7, 50]
        else:
            assert sum(int(k.sum()) for k in keep) == round(0.2 * sum(counts))


def test_neuron_masks_drop_whole_units() -> None:
    cfg = _children(mask="random", structure="neuron", sparsity=0.5)
    mask = _masks(cfg, _genomes(cfg, 1))[0]
    conv = mask["features.0.weight"]
    per_filter = conv.flatten(1)
    assert torch.equal(per_filter.all(dim=1), per_filter.any(dim=1))  # a filter is kept or dropped whole
    assert torch.equal(mask["features.0.bias"], per_filter[:, 0])


def test_classifier_is_never_pruned() -> None:
    for mask in ("random", "antirandom", "partition"):
        cfg = _children(mask=mask)
        assert not any(name.startswith("classifier") for name in _masks(cfg, _genomes(cfg, 2))[0])
    with pytest.raises(ConfigError) as info:
        make_family(_children(layers=["classifier.*"])).bind(_model())
    assert info.value.field == "children.layers"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_pruned_weights_stay_zero_after_tuning(optimizer: str) -> None:
    """Tuning (momentum, weight decay / Adam, bagging) never revives a pruned weight; kept ones move."""
    cfg = ChildrenConfig(family="sparse", mask="random", sparsity=0.7,
                         tune=TuneConfig(epochs=2, lr=0.05, optimizer=optimizer, bagging=True))
    model = _model()
    gen = torch.Generator().manual_seed(0)
    data = Split(torch.randn(200, *SHAPE, generator=gen), torch.randint(0, 10, (200,), generator=gen))
    materialiser = make_family(cfg).bind(model, SplitTrainer(data))
    parent = {k: v.clone() for k, v in model.state_dict().items()}
    genome = _genomes(cfg, 1)[0]
    masks = materialiser.masks(decode_genome(genome)["mask"])
    with materialiser.materialised(genome):
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            assert torch.all(params[name][~mask] == 0), name
            assert not torch.equal(params[name][mask], parent[name][mask]), f"{name} was not tuned"
        assert not torch.equal(params["classifier.weight"], parent["classifier.weight"])
    assert all(torch.equal(v, parent[k]) for k, v in model.state_dict().items())  # parent restored


@pytest.mark.slow
def test_same_genome_same_mask_in_another_process(tmp_path: Path) -> None:
    cfg = _children(mask="partition", structure="neuron", scope="layerwise")
    genome = _genomes(cfg, 3)[2]
    here = _masks(cfg, [genome])[0]
    script = f"""
import torch, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_sparse import _children, _masks
cfg = _children(mask="partition", structure="neuron", scope="layerwise")
torch.save(_masks(cfg, [{genome!r}])[0], {str(tmp_path / 'm.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    there = torch.load(tmp_path / "m.pt", weights_only=True)
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)


def test_config_checks() -> None:
    base = deep_merge(dict(TINY, children={}), {"output_dir": "/tmp/unused",
                                                "children": {"family": "sparse", "mask": "antirandom"}})
    with pytest.raises(ConfigError) as info:
        config_from_dict(deep_merge(base, {"children": {"sparsity": 0.3}}))
    assert info.value.field == "children.sparsity"
    with pytest.raises(ConfigError) as info:
        config_from_dict(deep_merge(base, {"search": {"population": 7}}))
    assert info.value.field == "search.population"
    with pytest.raises(ConfigError) as info:
        config_from_dict(deep_merge(base, {"children": {"mask": "partition", "partition_overlap": 8}}))
    assert info.value.field == "children.partition_overlap"


SPARSE_RUN = deep_merge(dict(TINY, children={}),
                        {"children": {"family": "sparse", "mask": "partition", "tune": {"epochs": 1}},
                         "search": {"population": 4, "generations": 1, "elites": 2},
                         "ensemble": {"size": 4}})


def _run(tmp_path: Path, name: str, extra: dict | None = None) -> evo_subens.RunResult:
    config = deep_merge(SPARSE_RUN, dict(extra or {}, output_dir=str(tmp_path), name=name))
    return evo_subens.run(config, progress=lambda line: None)


@pytest.mark.slow
def test_sparse_run_stores_members_compactly(tmp_path: Path) -> None:
    """A partition ensemble: members are stored packed, unpack to masked weights, metrics use them."""
    result = _run(tmp_path, "part", {"finetune": {"epochs": 1}})
    members = json.loads((result.run_dir / "members.json").read_text())
    cfg = evo_subens.load_config(result.run_dir / "config.yaml")
    family = make_family(cfg.children)
    model = build_model(cfg.model, (1, 8, 8), 10)
    materialiser = family.bind(model)
    dense = sum(v.numel() for v in model.state_dict().values())
    kept_total = {}
    for member in members:
        packed = torch.load(result.run_dir / member["weights"], weights_only=True)
        assert sum(v.numel() for v in packed.values()) < dense
        state = family.unpack(packed, member["genome"], materialiser)
        masks = materialiser.masks(decode_genome(member["genome"])["mask"])
        for name, mask in masks.items():
            assert torch.all(state[name][~mask] == 0)  # still pruned after tuning and fine-tuning
            kept_total[name] = kept_total.get(name, 0) + mask.long()
    for name, count in kept_total.items():  # the 4 members partition the parent
        assert torch.equal(count, torch.ones_like(count)), name
    candidates = result.population[result.population["generation"] >= 0]
    assert candidates["density"].eq(0.25).all()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_and_local_sparse_runs_agree(ray_session, tmp_path: Path) -> None:
    """Tuned children fetched from Ray actors equal those tuned in-process (same metrics and weights)."""
    local = _run(tmp_path, "local")
    remote = _run(tmp_path, "ray", {"workers": {"executor": "ray", "num_actors": 2}})
    assert untimed(local.metrics) == untimed(remote.metrics)
    for i in range(4):
        a = torch.load(local.run_dir / f"members/{i}.pt", weights_only=True)
        b = torch.load(remote.run_dir / f"members/{i}.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_killed_sparse_run_resumes_to_the_same_members(tmp_path: Path, cli_command) -> None:
    """Killed after the tuning generation (tuned weights lived only in the workers): resume re-tunes the
    members deterministically, giving the same packed weights and metrics as an uninterrupted run."""
    import os
    import signal

    import yaml

    config = tmp_path / "sparse.yaml"
    config.write_text(yaml.safe_dump(dict(SPARSE_RUN, output_dir=str(tmp_path / "runs"))))

    def cli(*args: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "EVO_SUBENS_CRASH_AT"}
        if crash_at:
            env["EVO_SUBENS_CRASH_AT"] = crash_at
        return subprocess.run(cli_command + list(args), capture_output=True, text=True, env=env, timeout=300)

    assert cli("run", str(config), "name=straight").returncode == 0
    killed = cli("run", str(config), "name=killed", crash_at="search.after_generation:1")
    assert killed.returncode == -signal.SIGKILL
    assert cli("resume", str(tmp_path / "runs" / "killed")).returncode == 0
    straight, resumed = tmp_path / "runs" / "straight", tmp_path / "runs" / "killed"
    assert untimed(json.loads((straight / "metrics.json").read_text())) == untimed(
        json.loads((resumed / "metrics.json").read_text()))
    for i in range(4):
        a = torch.load(straight / f"members/{i}.pt", weights_only=True)
        b = torch.load(resumed / f"members/{i}.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
