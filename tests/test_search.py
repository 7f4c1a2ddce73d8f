"""Whole runs: the population log, elitism, member selection, run-directory files, reproducibility,
test-split isolation, parent reuse, Ray vs in-process agreement and member fine-tuning.

Read-only checks share one module-scoped in-process run (``local_run``); Ray tests use the
session's ``ray_session`` (2 CPUs)."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import evo_subens
import evo_subens.tasks.classification.task as task_module
from evo_subens.core.config import RunConfig, WorkersConfig, load_config
from evo_subens.tasks.classification.data import Split, hold_out, load_dataset
from evo_subens.errors import ConfigError
from evo_subens.core.worker import parent_fingerprint
from evo_subens.tasks.classification.evaluation import EvaluationPayload
from evo_subens.families import decode_genome, make_family
from evo_subens.tasks.classification.metrics import classification_metrics
from evo_subens.tasks.classification.models import build_model
from evo_subens.core.problem import LOCAL_WORKER, make_problem
from evo_subens.core.rundir import population_schema
from evo_subens.core.search import CandidateRecord, Ranking, select_members
from evo_subens.tasks.classification.metrics import VALIDATION_METRICS

from conftest import RUNTIME_COLUMNS, untimed

QUIET = {"progress": lambda line: None}


def run_tiny(tiny_config, output_dir: Path, name: str, extra: dict | None = None) -> evo_subens.RunResult:
    """A tiny run named ``name`` under ``output_dir`` (``tiny_config`` is the conftest factory)."""
    cfg = tiny_config(output_dir, dict(extra or {}, name=name))
    return evo_subens.run(cfg, **QUIET)


def read_run(run_dir: Path) -> tuple[pd.DataFrame, list[dict], dict]:
    """population.parquet's candidate rows (without the parent's reference row), members.json and
    metrics.json of a run directory."""
    population = pd.read_parquet(run_dir / "population.parquet")
    population = population[population["generation"] >= 0].reset_index(drop=True)
    members = json.loads((run_dir / "members.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return population, members, metrics


def ranked(frame: pd.DataFrame, fitness: str) -> pd.DataFrame:
    """Candidates best first: the fitness metric, the other metric, then the candidate id."""
    if fitness == "accuracy":
        return frame.sort_values(["val_accuracy", "val_nll", "candidate"], ascending=[False, True, True])
    return frame.sort_values(["val_nll", "val_accuracy", "candidate"], ascending=[True, False, True])


def assert_members_are_the_best(population: pd.DataFrame, members: list[dict], size: int, fitness: str) -> None:
    """members.json and the is_member column hold the ``size`` best candidates, best first."""
    best = ranked(population, fitness)["candidate"].head(size).tolist()
    assert [m["candidate"] for m in members] == best, "members.json: the best candidates, best first"
    assert sorted(population.loc[population["is_member"], "candidate"]) == sorted(best)


def state_probs(cfg: RunConfig, states: list[dict], x: torch.Tensor, input_shape, num_classes) -> list[torch.Tensor]:
    """Softmax outputs on ``x`` of the config's architecture loaded with each state_dict."""
    model = build_model(cfg.model, input_shape, num_classes).eval()
    out = []
    for state in states:
        model.load_state_dict(state)
        with torch.no_grad():
            out.append(model(x).float().softmax(dim=1))
    return out


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def local_run(tiny_config, runs_dir: Path) -> evo_subens.RunResult:
    """One tiny in-process run shared by the read-only checks below."""
    return run_tiny(tiny_config, runs_dir, "base")


# --- the population log -----------------------------------------------------------------------------


def test_population_log_rows_and_schema(local_run: evo_subens.RunResult) -> None:
    """One row per candidate, ids 0..N-1, `population` rows per generation, documented dtypes."""
    cfg = load_config(local_run.run_dir / "config.yaml")
    population, _, _ = read_run(local_run.run_dir)
    n = cfg.search.population * cfg.search.generations
    assert len(population) == n
    assert population["candidate"].tolist() == list(range(n))
    assert population.groupby("generation").size().to_dict() == {
        g: cfg.search.population for g in range(cfg.search.generations)}
    schema = population_schema(make_family(cfg.children).log_columns, ["accuracy", "nll"])
    assert list(population.columns) == list(schema)
    assert {c: str(t) for c, t in population.dtypes.items()} == schema
    assert (population["worker"] == "local").all() and (population["host"] == "local").all()
    assert population["fitness"].equals(population["val_accuracy"])  # fitness: accuracy
    assert population["val_accuracy"].between(0, 1).all() and (population["val_nll"] > 0).all()
    full = pd.read_parquet(local_run.run_dir / "population.parquet")
    assert local_run.population.equals(full)


def test_population_log_and_metrics_say_when(local_run: evo_subens.RunResult) -> None:
    """Every row has the wall-clock time its evaluation ended, in the run's time span and in generation
    order; metrics.json has each generation's wall time and end."""
    population = local_run.population
    stamps = population["finished_at"]
    assert stamps.notna().all()
    started = pd.Timestamp((local_run.run_dir / "config.yaml").stat().st_mtime, unit="s", tz="UTC")
    assert (stamps >= started - pd.Timedelta(minutes=1)).all() and (stamps <= pd.Timestamp.now(tz="UTC")).all()
    by_generation = stamps.groupby(population["generation"])
    assert (by_generation.min().iloc[1:].to_numpy() >= by_generation.max().iloc[:-1].to_numpy()).all()
    checks = local_run.metrics["search"]["generations"]
    assert [c["generation"] for c in checks] == sorted(set(population["generation"]) - {-1})
    for check, last in zip(checks, by_generation.max().iloc[1:]):
        assert check["seconds"] > 0
        assert pd.Timestamp(check["finished_at"]) >= last.floor("s")


def test_population_log_starts_with_the_parent(local_run: evo_subens.RunResult) -> None:
    """The first row is the trained parent scored like a candidate on the same validation split
    (generation -1): the reference every candidate is read against, also in metrics.json."""
    population = local_run.population
    reference = population.iloc[0]
    assert reference["generation"] == -1 and reference["candidate"] == -1 and reference["depth"] == 0
    assert not reference["is_member"] and not reference["is_elite"]
    assert (population["generation"].iloc[1:] >= 0).all()
    validation = local_run.metrics["validation"]["parent"]
    assert reference["val_accuracy"] == pytest.approx(validation["accuracy"], abs=1e-12)
    assert reference["val_nll"] == pytest.approx(validation["nll"], rel=1e-6)


def test_elites_are_the_next_generations_parents(local_run: evo_subens.RunResult) -> None:
    """Generation g+1 mutates exactly the `elites` best candidates seen up to generation g."""
    cfg = load_config(local_run.run_dir / "config.yaml")
    population, _, _ = read_run(local_run.run_dir)
    assert (population.loc[population["generation"] == 0, "parent"] == -1).all()
    for g in range(cfg.search.generations):
        elites = set(ranked(population[population["generation"] <= g], "accuracy")["candidate"]
                     .head(cfg.search.elites))
        marked = set(population.loc[(population["generation"] == g) & population["is_elite"], "candidate"])
        assert marked == {c for c in elites if population.loc[c, "generation"] == g}, g
        if g + 1 < cfg.search.generations:
            parents = set(population.loc[population["generation"] == g + 1, "parent"])
            assert parents == elites, g
            assert population.loc[list(parents), "is_elite"].all()


def test_children_extend_their_parents_genome(local_run: evo_subens.RunResult) -> None:
    """A child's genome is its parent's steps plus one; depth/seed/mask_seed describe that last step."""
    population, _, _ = read_run(local_run.run_dir)
    genomes = {row.candidate: decode_genome(row.genome) for row in population.itertuples()}
    for row in population.itertuples():
        steps = genomes[row.candidate]["steps"]
        parent_steps = [] if row.parent == -1 else genomes[row.parent]["steps"]
        assert steps[:-1] == parent_steps
        assert row.depth == len(steps)
        assert (row.mask_seed, row.seed, row.density, row.sigma) == tuple(steps[-1])


def test_members_are_the_best_candidates(local_run: evo_subens.RunResult) -> None:
    """members.json lists the ensemble.size best candidates by the fitness, and is_member marks them."""
    cfg = load_config(local_run.run_dir / "config.yaml")
    population, members, _ = read_run(local_run.run_dir)
    assert len(members) == cfg.ensemble.size == int(population["is_member"].sum())
    assert_members_are_the_best(population, members, cfg.ensemble.size, cfg.search.fitness)
    by_id = population.set_index("candidate")
    for m in members:
        assert m["genome"] == by_id.loc[m["candidate"], "genome"]
        assert m["val_accuracy"] == by_id.loc[m["candidate"], "val_accuracy"]
        assert m["weights"] is None
    assert local_run.member_genomes == [m["genome"] for m in members]
    assert not (local_run.run_dir / "members").exists()


def test_run_directory_files(local_run: evo_subens.RunResult, tiny_config) -> None:
    """config.yaml reloads to the run's config; parent.pt is a plain state_dict the genomes point at;
    metrics.json has accuracy/nll/ece for the parent, the ensemble and each member."""
    run_dir = local_run.run_dir
    assert load_config(run_dir / "config.yaml") == tiny_config(run_dir.parent, {"name": "base"})
    state = torch.load(run_dir / "parent.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    population, members, metrics = read_run(run_dir)
    assert {decode_genome(g)["parent"] for g in population["genome"]} == {parent_fingerprint(state)}
    for key in ("parent", "ensemble"):
        assert {"accuracy", "nll", "ece"} <= set(metrics[key]), key
    assert len(metrics["members"]) == len(members)
    for m, entry in zip(members, metrics["members"]):
        assert {"accuracy", "nll", "ece"} <= set(entry) and entry["candidate"] == m["candidate"]
    assert untimed(metrics) == untimed(local_run.metrics)


def test_metrics_come_from_the_logged_genomes(local_run: evo_subens.RunResult) -> None:
    """Re-materialising parent.pt + each member genome reproduces the validation scores in the log and
    the test metrics in metrics.json (member and ensemble)."""
    cfg = load_config(local_run.run_dir / "config.yaml")
    population, members, metrics = read_run(local_run.run_dir)
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes).eval()
    model.load_state_dict(torch.load(local_run.run_dir / "parent.pt", weights_only=True))
    materialiser = make_family(cfg.children).bind(model)
    states = []
    for m in members:
        with materialiser.materialised(m["genome"]):
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    selection, _ = hold_out(data.validation, cfg.ensemble.holdout)  # candidates are scored on this part
    val = state_probs(cfg, states, selection.x, data.input_shape, data.num_classes)
    for m, probs in zip(members, val):
        assert classification_metrics(probs, selection.y)["accuracy"] == m["val_accuracy"]
    test = state_probs(cfg, states, data.test.x, data.input_shape, data.num_classes)
    for entry, probs in zip(metrics["members"], test):
        got = classification_metrics(probs, data.test.y)
        assert got["accuracy"] == entry["accuracy"]
        assert got["nll"] == pytest.approx(entry["nll"], abs=1e-6)
    ensemble = classification_metrics(torch.stack(test).mean(0), data.test.y)
    assert ensemble["accuracy"] == metrics["ensemble"]["accuracy"]
    assert ensemble["nll"] == pytest.approx(metrics["ensemble"]["nll"], abs=1e-6)
    assert metrics["test_samples"] == len(data.test)


# --- reproducibility and test-split isolation -------------------------------------------------------


def _comparable(population: pd.DataFrame) -> pd.DataFrame:
    return population.drop(columns=RUNTIME_COLUMNS)


@pytest.mark.slow
def test_same_config_same_results(local_run: evo_subens.RunResult, runs_dir: Path, tiny_config) -> None:
    """The same config run again (another name) gives an identical population log and metrics."""
    again = run_tiny(tiny_config, runs_dir, "again")
    pop_a, members_a, metrics_a = read_run(local_run.run_dir)
    pop_b, members_b, metrics_b = read_run(again.run_dir)
    pd.testing.assert_frame_equal(_comparable(pop_a), _comparable(pop_b))
    assert members_a == members_b
    assert untimed(metrics_a) == untimed(metrics_b)


@pytest.mark.slow
def test_test_split_does_not_leak_into_selection(local_run: evo_subens.RunResult, runs_dir: Path, tiny_config,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Replacing the test split (other inputs, random labels) changes only metrics.json."""
    real_load = task_module.load_dataset

    def other_test_split(cfg):
        data = real_load(cfg)
        gen = torch.Generator().manual_seed(1234)
        test = Split(torch.rand(data.test.x.shape, generator=gen),
                     torch.randint(0, data.num_classes, data.test.y.shape, generator=gen))
        return dataclasses.replace(data, test=test)

    monkeypatch.setattr(task_module, "load_dataset", other_test_split)
    swapped = run_tiny(tiny_config, runs_dir, "swapped-test")
    pop_a, members_a, metrics_a = read_run(local_run.run_dir)
    pop_b, members_b, metrics_b = read_run(swapped.run_dir)
    pd.testing.assert_frame_equal(_comparable(pop_a), _comparable(pop_b))
    assert members_a == members_b
    parent_a = torch.load(local_run.run_dir / "parent.pt", weights_only=True)
    parent_b = torch.load(swapped.run_dir / "parent.pt", weights_only=True)
    assert all(torch.equal(parent_a[k], parent_b[k]) for k in parent_a)
    assert metrics_a["parent"] != metrics_b["parent"]
    assert metrics_a["ensemble"] != metrics_b["ensemble"]


def test_parent_path_reuses_a_trained_parent(local_run: evo_subens.RunResult, runs_dir: Path,
                                             tiny_config) -> None:
    """model.parent_path loads parent.pt instead of training; the same seed then gives the same search."""
    reused = run_tiny(tiny_config, runs_dir, "reused",
                      {"model": {"parent_path": str(local_run.run_dir / "parent.pt")}, "parent": {"epochs": 50}})
    pop_a, members_a, metrics_a = read_run(local_run.run_dir)
    pop_b, members_b, metrics_b = read_run(reused.run_dir)
    pd.testing.assert_frame_equal(_comparable(pop_a), _comparable(pop_b))
    assert members_a == members_b and metrics_a["parent"] == metrics_b["parent"]


def _record(candidate: int, accuracy: float, nll: float) -> CandidateRecord:
    return CandidateRecord(generation=0, candidate=candidate, parent=-1, genome=f"g{candidate}", fitness=nll,
                           metrics={"accuracy": accuracy, "nll": nll}, eval_seconds=0.0, worker=-1)


@pytest.mark.parametrize("nan_first", [True, False])
def test_diverged_candidates_are_never_selected(nan_first: bool) -> None:
    """A child whose validation NLL is NaN (diverged weights) ranks last, wherever it is in the log."""
    records = [_record(1, 0.5, 1.0), _record(2, 0.4, 2.0), _record(3, 0.6, 0.5)]
    diverged = _record(0, 0.1, math.nan)
    records = [diverged, *records] if nan_first else [*records, diverged]
    for fitness in ("nll", "accuracy"):
        ranking = Ranking(VALIDATION_METRICS, fitness)
        assert [r.candidate for r in select_members(records, 2, ranking)] == [3, 1]


class BatchNormMLP(nn.Module):
    """A user architecture (loaded through model.architecture) with BatchNorm buffers."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@pytest.mark.slow
def test_run_with_batchnorm_architecture(tiny_config, tmp_path: Path) -> None:
    """A model.architecture with BatchNorm (0-dim num_batches_tracked buffers) runs end to end."""
    result = run_tiny(tiny_config, tmp_path, "bn", {"model": {"architecture": f"{__name__}:BatchNormMLP",
                                                            "kwargs": {"hidden": 16}}})
    population, members, _ = read_run(result.run_dir)
    assert len(population) == 16 and len(members) == 3


# --- Ray ----------------------------------------------------------------------------------------------


def payload_and_genomes(cfg: RunConfig, count: int) -> tuple[EvaluationPayload, list[str]]:
    """An evaluation payload (untrained seeded parent, real validation split) and ``count`` children."""
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    payload = EvaluationPayload(model=cfg.model, input_shape=data.input_shape, num_classes=data.num_classes,
                                parent_state=state, parent_id=parent_fingerprint(state), children=cfg.children,
                                val_x=data.validation.x, val_y=data.validation.y, batch_size=64, threads=1)
    family = make_family(cfg.children)
    rng = np.random.default_rng(0)
    return payload, [g for _, g in family.propose([family.root(payload.parent_id)], count, rng)]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_and_local_problems_agree(ray_session, tiny_config, tmp_path: Path) -> None:
    """The same genomes score identically in 2 Ray actors and in-process; workers are reported."""
    payload, genomes = payload_and_genomes(tiny_config(tmp_path), 6)

    evals = {}
    for executor in ("ray", "local"):
        workers = WorkersConfig(executor=executor, num_actors=2, subbatch_size=1)
        problem = make_problem(workers, payload, fitness="accuracy", population=len(genomes))
        try:
            batch = problem.make_batch(genomes)
            problem.evaluate(batch)
            evals[executor] = batch.evals.cpu().numpy()
        finally:
            problem.close()
    ray_evals, local_evals = evals["ray"], evals["local"]
    assert np.array_equal(ray_evals[:, 1], local_evals[:, 1])            # val_accuracy
    np.testing.assert_allclose(ray_evals[:, 2], local_evals[:, 2], rtol=0, atol=1e-9)  # val_nll
    assert np.array_equal(ray_evals[:, 0], ray_evals[:, 1])              # fitness = accuracy
    assert set(ray_evals[:, 4].astype(int)) == {0, 1}
    assert set(local_evals[:, 4].astype(int)) == {LOCAL_WORKER}
    assert len(set(local_evals[:, 1])) > 1, "children should not all score the same"


@pytest.mark.ray
@pytest.mark.slow
def test_full_run_with_ray(ray_session, local_run: evo_subens.RunResult, runs_dir: Path, tiny_config) -> None:
    """The default executor runs end to end in Ray actors and finds the same candidates as in-process."""
    result = run_tiny(tiny_config, runs_dir, "ray", {"workers": {"executor": "ray"}})
    population, members, _ = read_run(result.run_dir)
    assert population["worker"].str.fullmatch(r"actor-\d+").all()
    assert population["worker"].nunique() == 2  # one actor per CPU of the 2-CPU test cluster
    assert population["host"].iloc[1:].str.fullmatch(r"\d+\.\d+\.\d+\.\d+").all()  # the parent: "local"
    local_population, local_members, _ = read_run(local_run.run_dir)
    assert population["genome"].equals(local_population["genome"])
    assert population["val_accuracy"].equals(local_population["val_accuracy"])
    np.testing.assert_allclose(population["val_nll"], local_population["val_nll"], rtol=0, atol=1e-9)
    assert [m["candidate"] for m in members] == [m["candidate"] for m in local_members]


# --- fine-tuning ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_writes_member_weights(tiny_config, tmp_path: Path) -> None:
    """finetune.epochs=1 writes members/<i>.pt (listed in members.json), tuned away from the untuned
    child, and the test metrics are those of the tuned weights."""
    extra = {"finetune": {"epochs": 1}, "search": {"fitness": "nll"}, "ensemble": {"size": 2}}
    result = run_tiny(tiny_config, tmp_path, "tuned", extra)
    cfg = load_config(result.run_dir / "config.yaml")
    population, members, metrics = read_run(result.run_dir)
    assert_members_are_the_best(population, members, 2, "nll")
    assert population["fitness"].equals(population["val_nll"])

    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    model.load_state_dict(torch.load(result.run_dir / "parent.pt", weights_only=True))
    materialiser = make_family(cfg.children).bind(model)
    tuned_states = []
    for i, m in enumerate(members):
        assert m["weights"] == f"members/{i}.pt"
        tuned = torch.load(result.run_dir / m["weights"], weights_only=True)
        with materialiser.materialised(m["genome"]):
            untuned = {k: v.clone() for k, v in model.state_dict().items()}
        assert tuned.keys() == untuned.keys()
        assert not all(torch.equal(tuned[k], untuned[k]) for k in tuned), f"member {i} was not fine-tuned"
        tuned_states.append(tuned)
    probs = state_probs(cfg, tuned_states, data.test.x, data.input_shape, data.num_classes)
    for entry, p in zip(metrics["members"], probs):
        assert classification_metrics(p, data.test.y)["accuracy"] == entry["accuracy"]


# --- Ray resources (kept last: on failure it leaves killed, never-scheduled actors behind) -------------


@pytest.mark.ray
@pytest.mark.slow
def test_gpu_request_without_gpus_does_not_hang(ray_session, tiny_config, tmp_path: Path) -> None:
    """workers.num_gpus_per_actor > 0 on a Ray cluster without GPUs (documented: actors use CUDA 'when a
    GPU is present') must either evaluate on CPU or be rejected up front, not wait forever for GPUs."""
    if ray_session.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this check needs a Ray cluster without GPUs")
    payload, genomes = payload_and_genomes(tiny_config(tmp_path), 2)
    workers = WorkersConfig(executor="ray", num_actors=2, num_gpus_per_actor=1.0)  # 1 actor = in-process
    try:
        problem = make_problem(workers, payload, fitness="accuracy", population=len(genomes))
    except ConfigError as exc:  # rejecting the config is an acceptable answer
        assert exc.field == "workers.num_gpus_per_actor"
        return
    done: dict = {}

    def evaluate() -> None:
        try:
            batch = problem.make_batch(genomes)
            problem.evaluate(batch)
            done["evals"] = batch.evals.cpu().numpy()
        except Exception as exc:  # e.g. the actors being killed below while still pending
            done["error"] = exc

    thread = threading.Thread(target=evaluate, daemon=True)
    thread.start()
    thread.join(timeout=120)  # generous: evaluating 2 genomes takes seconds; waiting for GPUs takes forever
    try:
        assert not thread.is_alive(), "evaluation still waiting for GPUs after 120 s"
        assert "evals" in done, done.get("error")
        assert done["evals"].shape[0] == len(genomes)
    finally:
        problem.close()


@pytest.mark.ray
def test_more_actors_than_cluster_cpus_is_refused(ray_session, tiny_config, tmp_path: Path) -> None:
    """Actors that could never be placed are a config error naming workers.num_actors, not a hang."""
    payload, _ = payload_and_genomes(tiny_config(tmp_path), 2)
    cpus = int(ray_session.cluster_resources()["CPU"])
    with pytest.raises(ConfigError) as info:
        make_problem(WorkersConfig(num_actors=cpus + 1), payload, fitness="accuracy", population=4)
    assert info.value.field == "workers.num_actors"


@pytest.mark.ray
@pytest.mark.slow
def test_single_actor_still_evaluates_in_ray(ray_session, tiny_config, tmp_path: Path) -> None:
    """num_actors=1 keeps one Ray actor (EvoTorch alone would evaluate in the driver)."""
    payload, genomes = payload_and_genomes(tiny_config(tmp_path), 3)
    problem = make_problem(WorkersConfig(num_actors=1), payload, fitness="accuracy", population=len(genomes))
    try:
        batch = problem.make_batch(genomes)
        problem.evaluate(batch)
        assert set(batch.evals.cpu().numpy()[:, 4].astype(int)) == {0}
        assert problem.worker_devices() == ["cpu"]
    finally:
        problem.close()


def test_metrics_hold_growth_curve_and_diversity(local_run: evo_subens.RunResult) -> None:
    """metrics.json: the growth curve ends at the ensemble; diversity matrices are members x members."""
    _, members, metrics = read_run(local_run.run_dir)
    growth = metrics["growth"]
    assert [g["members"] for g in growth] == list(range(1, len(members) + 1))
    assert growth[0]["accuracy"] == metrics["members"][0]["accuracy"]
    assert growth[-1]["accuracy"] == metrics["ensemble"]["accuracy"]
    assert growth[-1]["nll"] == pytest.approx(metrics["ensemble"]["nll"], abs=1e-7)  # float32 average vs float64 running sum
    for name in ("disagreement", "kl", "correlation", "cka"):
        matrix = metrics["diversity"][name]["matrix"]
        assert len(matrix) == len(members) and all(len(row) == len(members) for row in matrix)
    assert all(metrics["diversity"]["disagreement"]["matrix"][i][i] == 0 for i in range(len(members)))
    assert all(row[i] == pytest.approx(1.0) for i, row in enumerate(metrics["diversity"]["cka"]["matrix"]))
    assert 0 <= metrics["diversity"]["disagreement"]["mean"] <= 1


def test_greedy_selection_by_hand() -> None:
    """Caruana forward selection with replacement: A and B tie alone (NLL 0.399), A+B beats A+A and A+C
    (0.357), then A again (ties with B at 0.361, lower index wins): picks [A, B, A]."""
    from evo_subens.tasks.classification.selection import greedy_selection

    labels = torch.tensor([0, 1])
    a = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    b = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    c = torch.tensor([[0.6, 0.4], [0.4, 0.6]])
    assert greedy_selection([a, b, c], labels, 3) == [0, 1, 0]
    assert greedy_selection([c, a], labels, 1) == [1]


@pytest.mark.slow
def test_greedy_run_picks_from_the_pool(tiny_config, tmp_path: Path) -> None:
    """ensemble.selection=greedy: members come from the best `pool` candidates by fitness, the greedy
    picks minimise validation NLL step by step, and the test metrics are those of the picks."""
    extra = {"ensemble": {"size": 3, "selection": "greedy", "pool": 4}, "search": {"fitness": "nll"}}
    result = run_tiny(tiny_config, tmp_path, "greedy", extra)
    population, members, metrics = read_run(result.run_dir)
    pool = population.sort_values(["val_nll", "candidate"]).head(4)["candidate"].tolist()
    assert len(members) == 3 and all(m["candidate"] in pool for m in members)
    assert set(population.loc[population.is_member, "candidate"]) == {m["candidate"] for m in members}
    assert len(metrics["members"]) == 3 and metrics["growth"][-1]["accuracy"] == metrics["ensemble"]["accuracy"]
