"""Child families as plug-ins: a family is one module (config section, log columns, Family) plus a registry
entry. A family defined here, in the test module, runs a search end to end; the built-in families' config
sections, their errors and the migration of run directories written with one flat children section."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import evo_subens
from evo_subens.core.config import (DEFAULT_FAMILY, LR_SCHEDULES, ChildrenConfig, RunConfig, config_from_dict,
                                    config_to_dict, field_docs, load_config)
from evo_subens.core.logs import check_resume_compatible, flatten_config, read_run_config
from evo_subens.core.options import option
from evo_subens.core.rundir import POPULATION_SCHEMA, population_schema
from evo_subens.errors import ConfigError, RunDirError
from evo_subens.families import FAMILIES, Family, Materialiser, decode_genome, encode_genome, family_class, \
    make_family, register_family
from evo_subens.families.base import Undo
from evo_subens.families.noisy import NoisyConfig
from evo_subens.families.sparse import SparseConfig
from evo_subens.families.stochastic import SCHEDULES, StochasticConfig
from evo_subens.tasks.classification.training import lr_factor

from conftest import REPO, RUNTIME_COLUMNS, TINY

# --- a family in one file: every child is the parent with all its weights multiplied by one factor -----


@dataclass
class ScaledConfig(ChildrenConfig):
    """``children`` of the scaled family."""

    family: str = "scaled"
    spread: float = option(0.05, "standard deviation of a child's factor around 1", ge=0, le=0.5)

    def check(self, run: RunConfig) -> None:
        super().check(run)
        if self.spread == 0 and run.search.population > 1:
            raise ConfigError("children.spread", "> 0 when a generation has several children", self.spread)


class ScaledMaterialiser(Materialiser):
    def __init__(self, model: torch.nn.Module):
        self.model = model

    def apply(self, genome: str) -> Undo:
        factor = decode_genome(genome)["factor"]
        params = list(self.model.parameters())
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.mul_(factor)

        @torch.no_grad()
        def undo() -> None:
            for p, value in zip(params, saved):
                p.copy_(value)

        return undo


class ScaledFamily(Family):
    name = "scaled"
    config = ScaledConfig
    log_columns = {"factor": "float64"}

    def root(self, parent_id: str) -> str:
        return encode_genome({"family": self.name, "parent": parent_id, "factor": 1.0})

    def propose(self, parents: Sequence[str], count: int, rng: np.random.Generator, *,
                step_scale: float = 1.0) -> list[tuple[int, str]]:
        parent_id = decode_genome(parents[0])["parent"]
        factors = 1.0 + self.cfg.spread * step_scale * rng.standard_normal(count)
        return [(-1, encode_genome({"family": self.name, "parent": parent_id, "factor": float(f)}))
                for f in factors]

    def bind(self, model: torch.nn.Module, trainer: Any = None) -> ScaledMaterialiser:
        return ScaledMaterialiser(model)

    def describe(self, genome: str) -> dict[str, Any]:
        return {"factor": decode_genome(genome)["factor"]}


@pytest.fixture()
def scaled() -> type[ScaledFamily]:
    register_family("scaled", ScaledFamily)
    yield ScaledFamily
    FAMILIES.pop("scaled")


SCALED_RUN = dict(TINY, children={"family": "scaled", "spread": 0.1})


def test_a_family_from_outside_the_package_has_its_config_section(scaled) -> None:
    cfg = config_from_dict(SCALED_RUN)
    assert type(cfg.children) is ScaledConfig and cfg.children.spread == 0.1
    assert config_to_dict(cfg)["children"] == {"family": "scaled", "spread": 0.1}
    assert ChildrenConfig(family="scaled") == ScaledConfig()
    docs = {(name, doc) for name, doc, _ in field_docs()}
    assert ("children.spread", "[scaled] standard deviation of a child's factor around 1") in docs
    bad = [({"spread": 0.9}, "children.spread"),                          # its range
           ({"spread": 0.0}, "children.spread"),                          # its check, which reads the search
           ({"density": 0.2}, "children.density")]                        # a field of another family
    for extra, field in bad:
        with pytest.raises(ConfigError) as info:
            config_from_dict(dict(TINY, children=dict(SCALED_RUN["children"], **extra)))
        assert info.value.field == field
    assert "density belongs to the noisy family" in str(info.value)


@pytest.mark.slow
def test_a_family_from_outside_the_package_runs_a_search(scaled, tmp_path: Path) -> None:
    result = evo_subens.run(dict(SCALED_RUN, output_dir=str(tmp_path), name="scaled"), progress=lambda line: None)
    population = result.population
    assert list(population.columns) == list(population_schema({"factor": "float64"}, ["accuracy", "nll"]))
    assert population.loc[population.generation == -1, "factor"].tolist() == [1.0]
    candidates = population[population.generation >= 0]
    assert len(candidates) == 16 and candidates["factor"].nunique() == 16
    ensemble = evo_subens.load_ensemble(result.run_dir)
    members = candidates[candidates.is_member].set_index("candidate")
    assert len(ensemble.members) == 3 == len(members)
    for genome, member in zip(result.member_genomes, ensemble.members):
        factor = decode_genome(genome)["factor"]
        assert factor in set(members["factor"])
        for (name, weight), (_, parent) in zip(member.named_parameters(), ensemble.parent.named_parameters()):
            assert torch.equal(weight, parent * factor), name
    from evo_subens.report.run_report import write_report

    report = write_report(result.run_dir, features=False, progress=lambda line: None).read_text()
    assert "**scaled** children (spread 0.1)" in report


# --- the built-in families' sections ---------------------------------------------------------------------


@pytest.mark.parametrize("family, field, owners", [
    ("sparse", "density", "the noisy family"),
    ("noisy", "mask", "the sparse and stochastic families"),
    ("noisy", "tune", "the sparse and stochastic families"),
    ("sparse", "anneal_start", "the stochastic family"),
])
def test_a_field_of_another_family_names_its_family(family: str, field: str, owners: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"children.family={family}", f"children.{field}=1"])
    assert info.value.field == f"children.{field}"
    assert f"{field} belongs to {owners}" in str(info.value) and f"children.family is '{family}'" in str(info.value)


def test_family_choices_come_from_the_registry() -> None:
    with pytest.raises(ConfigError, match="one of 'noisy', 'sparse', 'stochastic'") as info:
        load_config(None, ["children.family=bogus"])
    assert info.value.field == "children.family"
    assert [family_class(name).config for name in FAMILIES] == [NoisyConfig, SparseConfig, StochasticConfig]
    assert ChildrenConfig() == NoisyConfig() and DEFAULT_FAMILY == "noisy"
    assert type(ChildrenConfig(family="stochastic", sparsity=0.9)) is StochasticConfig
    stochastic = {f.name: f for f in dataclasses.fields(StochasticConfig)}
    assert stochastic["anneal_schedule"].metadata["choices"] == tuple(SCHEDULES)
    for schedule in LR_SCHEDULES:
        assert lr_factor(schedule, 3, 10) > 0


def test_every_shipped_config_loads() -> None:
    paths = sorted(p for p in REPO.glob("configs/**/*.yaml") if p.parent.name != "ray")
    assert len(paths) > 40
    for path in paths:
        assert load_config(path).children.family in FAMILIES, path


@pytest.mark.slow
def test_checking_a_config_imports_no_ray_evotorch_or_task() -> None:
    """Config checks import the family modules (torch) and the tasks' config sections and metric
    declarations, never Ray, EvoTorch or the rest of a task; families never import a task."""
    script = """
import sys
from evo_subens.core.config import load_config
for family in ("noisy", "sparse", "stochastic"):
    load_config("configs/default.yaml" if family == "noisy" else None, [f"children.family={family}"])
# Task modules other than the config sections and metric declarations tasks keep light for this.
light = ("evo_subens.tasks.base",) + tuple(f"evo_subens.tasks.{t}.{m}" for t in ("classification", "rl")
                                          for m in ("config", "metrics"))
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "evotorch")
             or (m.startswith("evo_subens.tasks.") and m not in light and m.count(".") > 2))
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=300)


# --- run directories written when every family shared one flat children section ----------------------

def _flat_children(family: str) -> dict:
    """The children section as run directories wrote it before families had sections: every field."""
    return {"family": family, "density": 0.05, "sigma": 0.1, "sigma_mode": "relative", "subspace": "dynamic",
            "layers": ["*"], "include_classifier": True, "density_grid": [], "sigma_grid": [], "mask": "random",
            "sparsity": 0.5, "structure": "connection", "scope": "global", "partition_overlap": 1,
            "anneal_schedule": "cosine", "anneal_start": 0.5, "anneal_fraction": 0.5,
            "tune": {"epochs": 1, "batch_size": 128, "lr": 0.1, "lr_schedule": "onecycle", "optimizer": "sgd",
                     "momentum": 0.9, "nesterov": False, "weight_decay": 0.0005, "bagging": False}}


@pytest.mark.parametrize("family", ["noisy", "sparse", "stochastic"])
def test_saved_configs_with_every_familys_fields_still_load(tmp_path: Path, family: str) -> None:
    config = config_to_dict(load_config(None))
    config["children"] = _flat_children(family)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    saved = read_run_config(tmp_path)
    cfg = config_from_dict(saved)
    section = family_class(family).config
    assert type(cfg.children) is section
    assert set(saved["children"]) == {f.name for f in dataclasses.fields(section)}
    assert config_to_dict(cfg)["children"] == saved["children"]
    resolved = config_to_dict(cfg)
    check_resume_compatible(resolved, config_to_dict(config_from_dict(saved)), tmp_path)
    changed = "children.sigma=0.2" if family == "noisy" else "children.sparsity=0.6"
    with pytest.raises(RunDirError, match=f"cannot resume .* with {changed.split('=')[0]}="):
        from evo_subens.core.config import apply_overrides

        check_resume_compatible(resolved, config_to_dict(config_from_dict(apply_overrides(saved, [changed]))),
                                tmp_path)


@pytest.mark.slow
def test_an_old_run_directory_resumes_with_the_same_results(tmp_path: Path) -> None:
    """A run directory whose config.yaml has every family's fields: resume reads it and refuses changes."""
    quiet = {"progress": lambda line: None}
    first = evo_subens.run(dict(TINY, output_dir=str(tmp_path), name="old"), **quiet)
    config = yaml.safe_load((first.run_dir / "config.yaml").read_text())
    config["children"] = dict(_flat_children("noisy"), **config["children"])
    (first.run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    again = evo_subens.resume(first.run_dir, ["search.generations=3"], **quiet)
    longer = evo_subens.run(dict(TINY, output_dir=str(tmp_path), name="new", search=dict(TINY["search"],
                                                                                         generations=3)), **quiet)
    pd.testing.assert_frame_equal(again.population.drop(columns=RUNTIME_COLUMNS),
                                  longer.population.drop(columns=RUNTIME_COLUMNS))
    assert again.member_genomes == longer.member_genomes
    for change in ("children.sigma=0.3", "children.family=sparse"):
        with pytest.raises(RunDirError, match=f"cannot resume .* with {change.split('=')[0]}="):
            evo_subens.resume(first.run_dir, [change], **quiet)


def test_old_sparse_population_logs_load_with_todays_columns(tmp_path: Path) -> None:
    """Sparse logs kept the partition index in mask_seed next to constant sigma and depth columns."""
    config = config_to_dict(load_config(None))
    config["children"] = dict(_flat_children("sparse"), mask="partition")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    row = {"generation": 0, "candidate": 0, "parent": -1, "seed": 11, "mask_seed": 3, "density": 0.25,
           "sigma": 0.0, "depth": 1, "fitness": 0.5, "val_accuracy": 0.5, "val_nll": 1.0, "is_elite": True,
           "is_member": True, "eval_seconds": 0.1, "worker": "local", "node": "local", "raced": False,
           "diverged": False, "genome": "{}"}
    pd.DataFrame([row]).to_parquet(tmp_path / "population.parquet", index=False)
    population = evo_subens.load_population(tmp_path)
    assert list(population.columns) == list(population_schema(family_class("sparse").log_columns, ["accuracy", "nll"]))
    assert population[["seed", "part", "density"]].iloc[0].tolist() == [11, 3, 0.25]


def test_noisy_log_columns_keep_their_place() -> None:
    """The default family's columns and their order are those the population log always had."""
    schema = population_schema(family_class("noisy").log_columns, ["accuracy", "nll"])
    assert list(schema)[:9] == ["generation", "candidate", "parent", "seed", "mask_seed", "density", "sigma",
                                "grid_sigma", "depth"]
    assert set(schema) - set(POPULATION_SCHEMA) == {"seed", "mask_seed", "density", "sigma", "grid_sigma", "depth",
                                                    "val_accuracy", "val_nll"}
    assert list(schema)[9:12] == ["fitness", "val_accuracy", "val_nll"]  # the task's metrics follow the fitness
    assert make_family(ChildrenConfig()).describe(make_family(ChildrenConfig()).root("p")) == {
        "seed": -1, "mask_seed": -1, "density": 0.0, "sigma": 0.0, "grid_sigma": 0.0, "depth": 0}
    assert flatten_config(config_to_dict(RunConfig()))["children.family"] == "noisy"
