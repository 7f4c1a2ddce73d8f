"""Sample, perturb, optimise, select: fine-tuning in the workers, ensemble-level acceptance, the held-back
validation check, temperature scaling, the gain split, step-size adaptation and early stopping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import evo_subens
from evo_subens.tasks.classification.calibration import apply_temperature, fit_temperature
from evo_subens.tasks.classification.data import hold_out, load_dataset
from evo_subens.tasks.classification.metrics import classification_metrics, ensemble_gain, nll
from evo_subens.tasks.classification.selection import accept_members

from conftest import untimed

QUIET = {"progress": lambda line: None}
# Fine-tuning, acceptance and the held-back check on, as in the shipped defaults.
OPTIMISED = {"finetune": {"epochs": 1, "lr": 0.05, "lr_schedule": "onecycle"},
             "ensemble": {"size": 4, "acceptance": True, "holdout": 0.5}, "search": {"fitness": "nll"}}


def _run(tiny_config, tmp_path: Path, name: str, extra: dict | None = None) -> evo_subens.RunResult:
    from conftest import deep_merge

    return evo_subens.run(tiny_config(tmp_path / "runs", deep_merge(OPTIMISED, dict(extra or {}, name=name))),
                          **QUIET)


def _predict(result: evo_subens.RunResult, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ensemble = evo_subens.load_ensemble(result.run_dir)
    from evo_subens.tasks.classification.training import predict_probs

    return predict_probs(ensemble.parent, x), [predict_probs(m, x) for m in ensemble.members]


@pytest.fixture(scope="module")
def optimised_run(tiny_config, tmp_path_factory) -> evo_subens.RunResult:
    return _run(tiny_config, tmp_path_factory.mktemp("quality"), "optimised")


# --- acceptance -------------------------------------------------------------------------------------------


def test_acceptance_never_adds_a_member_that_worsens_the_validation_ensemble() -> None:
    """On random members of mixed quality, every accepted member lowers the validation ensemble's NLL and
    every rejected one would not have lowered it at the point it was tried."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (300,), generator=generator)
    onehot = torch.nn.functional.one_hot(labels, 5).double()
    members = []
    for quality in (3.0, 0.2, 2.5, -1.0, 1.5, 0.0, 2.0, -0.5):
        logits = quality * onehot + torch.randn(300, 5, generator=generator, dtype=torch.float64)
        members.append(logits.softmax(dim=1))
    accepted = accept_members([], members, labels)
    assert accepted[0] == 0 and 0 < len(accepted) < len(members)
    total, count, current = None, 0, math.inf
    for j, probs in enumerate(members):
        trial = (probs if total is None else total + probs) / (count + 1)
        if j in accepted:
            assert count == 0 or nll(trial, labels) < current
            total = probs if total is None else total + probs
            count += 1
            current = nll(total / count, labels)
        else:
            assert nll(trial, labels) >= current
    assert accept_members([], members, labels, enabled=False) == list(range(len(members)))
    # Growing: the kept ensemble is the starting point.
    assert accept_members(members[:1], members[1:], labels) == [j - 1 for j in accepted[1:]]


@pytest.mark.slow
def test_run_members_each_improved_the_validation_ensemble(optimised_run) -> None:
    """In a run, the accepted members (in joining order) lower the selection split's ensemble NLL at every
    step; the rejected candidates are listed in metrics.json and not in members.json."""
    cfg = optimised_run.metrics
    config = evo_subens.load_ensemble(optimised_run.run_dir).config
    data = load_dataset(config.data)
    selection, _ = hold_out(data.validation, config.ensemble.holdout)
    _, member_probs = _predict(optimised_run, selection.x)
    running = [nll(torch.stack(member_probs[:k]).mean(0), selection.y) for k in range(1, len(member_probs) + 1)]
    assert all(b < a for a, b in zip(running, running[1:]))
    members = json.loads((optimised_run.run_dir / "members.json").read_text())
    assert len(members) + len(cfg["rejected"]) == config.ensemble.size
    assert not {m["candidate"] for m in members} & set(cfg["rejected"])


# --- fine-tuning in the workers ---------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_finetuning_in_actors_equals_finetuning_in_process(ray_session, optimised_run, tiny_config,
                                                           tmp_path: Path) -> None:
    """Members fine-tuned in 2 Ray actors (in parallel) have bit for bit the weights of members fine-tuned
    in-process, and the same metrics."""
    local = optimised_run  # the same config, in-process
    remote = _run(tiny_config, tmp_path, "ray", {"workers": {"executor": "ray", "num_actors": 2}})
    assert untimed(local.metrics) == untimed(remote.metrics)
    files = sorted((local.run_dir / "members").glob("*.pt"))
    assert len(files) == 4
    for path in files:
        a = torch.load(path, weights_only=True)
        b = torch.load(remote.run_dir / "members" / path.name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path.name


@pytest.mark.slow
def test_finetuning_is_counted_in_the_cost(optimised_run) -> None:
    """Each selected candidate's fine-tuning epochs are in the cost record."""
    config = evo_subens.load_ensemble(optimised_run.run_dir).config
    expected = config.parent.epochs + config.finetune.epochs * config.ensemble.size
    assert optimised_run.metrics["cost"]["train_epochs"] == expected


# --- the held-back check, temperature scaling, the gain split ------------------------------------------


@pytest.mark.slow
def test_holdout_metrics_are_on_the_held_back_part(optimised_run) -> None:
    """metrics.json's holdout and validation blocks are parent and ensemble on the two parts of the
    validation split; the verdict is their difference."""
    config = evo_subens.load_ensemble(optimised_run.run_dir).config
    validation = load_dataset(config.data).validation
    selection, holdout = hold_out(validation, config.ensemble.holdout)
    assert len(selection) + len(holdout) == len(validation) and len(holdout) > 0
    metrics = optimised_run.metrics
    for name, split in (("validation", selection), ("holdout", holdout)):
        parent, members = _predict(optimised_run, split.x)
        assert metrics[name]["samples"] == len(split)
        assert metrics[name]["parent"]["nll"] == pytest.approx(nll(parent, split.y), rel=1e-9)
        assert metrics[name]["ensemble"]["nll"] == pytest.approx(nll(torch.stack(members).mean(0), split.y),
                                                                rel=1e-6)
    verdict = metrics["verdict"]["holdout"]
    difference = 100 * (metrics["holdout"]["ensemble"]["accuracy"] - metrics["holdout"]["parent"]["accuracy"])
    assert verdict["accuracy_points"] == pytest.approx(difference)
    assert verdict["rows"] == len(holdout) and verdict["beats_parent"] == (verdict["outcome"] == "better")


@pytest.mark.slow
def test_temperature_is_fitted_on_validation_only(optimised_run) -> None:
    """The recorded temperatures are the NLL minimisers on the validation split (not the test split), and
    the scaled test metrics apply them."""
    data = load_dataset(evo_subens.load_ensemble(optimised_run.run_dir).config.data)
    parent_val, members_val = _predict(optimised_run, data.validation.x)
    parent_test, members_test = _predict(optimised_run, data.test.x)
    scaled = optimised_run.metrics["temperature"]
    for name, val, test in (("parent", parent_val, parent_test),
                            ("ensemble", torch.stack(members_val).mean(0), torch.stack(members_test).mean(0))):
        t = scaled[name]["temperature"]
        assert t == pytest.approx(fit_temperature(val, data.validation.y), rel=1e-4)
        assert t != pytest.approx(fit_temperature(test, data.test.y), rel=1e-3)
        expected = classification_metrics(apply_temperature(test, t), data.test.y)
        assert scaled[name]["test"]["nll"] == pytest.approx(expected["nll"], rel=1e-4)
        assert scaled[name]["test"]["accuracy"] == pytest.approx(expected["accuracy"])


@pytest.mark.slow
def test_fit_temperature_finds_the_minimum() -> None:
    """Golden-section search agrees with a fine grid, on over- and under-confident predictions."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (500,), generator=generator)
    logits = 2 * torch.nn.functional.one_hot(labels, 4).double() + torch.randn(500, 4, generator=generator,
                                                                                dtype=torch.float64)
    for sharpness in (0.3, 3.0):
        probs = (sharpness * logits).softmax(dim=1)
        grid = torch.exp(torch.linspace(math.log(0.05), math.log(20), 4001, dtype=torch.float64)).tolist()
        # The grid's minimiser, found without scoring all 4001 points: NLL is unimodal in the temperature
        # (convex in its inverse), so the minimum lies within one coarse step of the coarse grid's best.
        coarse = min(range(0, len(grid), 20), key=lambda i: nll(apply_temperature(probs, grid[i]), labels))
        near = grid[max(0, coarse - 20):coarse + 21]
        best = min(near, key=lambda t: nll(apply_temperature(probs, t), labels))
        assert fit_temperature(probs, labels) == pytest.approx(best, rel=2e-3)
        assert nll(apply_temperature(probs, fit_temperature(probs, labels)), labels) <= nll(probs, labels)


@pytest.mark.slow
def test_gain_is_diversity_minus_member_cost(optimised_run) -> None:
    """gain = parent - ensemble = diversity - member cost, for NLL and accuracy, as computed from the
    metrics next to it."""
    gain = optimised_run.metrics["gain"]["test"]
    for metric in ("nll", "accuracy"):
        g = gain[metric]
        assert g["gain"] == pytest.approx(g["diversity"] - g["member_cost"], abs=1e-12)
    by_hand = ensemble_gain({"nll": 0.5, "accuracy": 0.8}, [{"nll": 0.6, "accuracy": 0.78}, {"nll": 0.5,
                            "accuracy": 0.8}], {"nll": 0.45, "accuracy": 0.81})
    assert by_hand["nll"]["member_cost"] == pytest.approx(0.05) and by_hand["nll"]["diversity"] == pytest.approx(0.1)
    assert by_hand["accuracy"]["gain"] == pytest.approx(0.01)


# --- step size and early stopping ------------------------------------------------------------------------


@pytest.mark.slow
def test_one_fifth_rule_and_early_stopping(tiny_config, tmp_path: Path) -> None:
    """The step scale follows the 1/5 rule from each generation's success rate, later genomes carry the
    scaled sigma, and a search that stops improving stops after `patience` generations and says so."""
    result = _run(tiny_config, tmp_path, "adaptive", {
        "search": {"generations": 6, "patience": 1, "step_size": "one_fifth", "step_factor": 0.5},
        "children": {"sigma": 2.0}})
    config = evo_subens.load_ensemble(result.run_dir).config
    search = result.metrics["search"]
    generations = search["generations"]
    scale = 1.0
    for g in generations:
        assert g["step_scale"] == pytest.approx(scale)
        scale *= 2.0 if g["success_rate"] > 0.2 else 0.5
    population = result.population[result.population.generation >= 0]
    for g in generations:
        sigmas = population.loc[population.generation == g["generation"], "sigma"]
        assert sigmas.eq(config.children.sigma * g["step_scale"]).all()
    if search["stopped_early"]:
        assert search["generations_run"] < 6
        assert generations[-1]["val_nll"] >= min(x["val_nll"] for x in generations[:-1])
    assert population.generation.max() + 1 == search["generations_run"]
    assert isinstance(search["later_generations_beat_first"], bool)


@pytest.mark.slow
def test_sparsity_table_tunes_children_of_one_parent(tmp_path: Path, capsys) -> None:
    """bench sparsity: one parent for every sparsity, `members` tuned children each, a table and the sparsity
    the model affords."""
    import yaml
    from conftest import tiny_dict
    from evo_subens.bench.sparsity import TOLERANCE, sparsity_table

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(tmp_path / "unused")))
    rows = sparsity_table(str(config), sparsities=[0.1, 0.9], members=2, tune_epochs=1,
                          output_dir=str(tmp_path / "runs"))
    assert [r["sparsity"] for r in rows] == [0.1, 0.9]
    assert rows[0]["parent_accuracy"] == rows[1]["parent_accuracy"]  # the same parent
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    first = json.loads((runs[0] / "members.json").read_text())
    assert len(first) == 2 and all(m["weights"] for m in first)
    out = capsys.readouterr().out
    afforded = [r["sparsity"] for r in rows if r["child_accuracy"] >= r["parent_accuracy"] - TOLERANCE]
    assert (f"affords: {max(afforded):.0%}" if afforded else "affords: none") in out
