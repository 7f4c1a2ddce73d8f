"""One run, top to bottom: data -> parent -> search -> members -> fine-tune -> ensemble -> test metrics.

    >>> import evo_subens
    >>> result = evo_subens.run("configs/default.yaml", ["search.generations=2"])
    >>> result.metrics["ensemble"]["nll"] < result.metrics["parent"]["nll"]
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from .config import RunConfig, apply_overrides, config_from_dict, load_config
from .data import DatasetSplits, load_dataset
from .evaluation import CandidateEvaluator, EvaluationPayload, parent_fingerprint
from .families import make_family
from .metrics import classification_metrics
from .models import build_model, count_parameters, load_parent_state
from .problem import LOCAL_WORKER, make_problem
from .rundir import create_run_dir, write_json, write_population, write_state
from .search import CandidateRecord, SubnetworkSearch, rank_key, select_members
from .training import predict_probs, train

Progress = Callable[[str], None]


@dataclass
class RunResult:
    """What a run produced; everything here is also in ``run_dir``."""

    run_dir: Path
    metrics: dict
    population: pd.DataFrame
    member_genomes: list[str]


def _population_rows(records: list[CandidateRecord], family) -> list[dict]:
    rows = []
    for record in records:
        row = record.as_row()
        row.update(family.describe(record.genome))
        row["worker"] = "local" if record.worker == LOCAL_WORKER else f"actor-{record.worker}"
        rows.append(row)
    return rows


def _build_parent(cfg: RunConfig, data: DatasetSplits) -> torch.nn.Module:
    """The parent architecture, with the user's weights if given; fails fast on a bad model, layer
    pattern or parent file (before the run directory exists)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    make_family(cfg.children).bind(build_model(cfg.model, data.input_shape, data.num_classes))
    if cfg.model.parent_path:
        load_parent_state(cfg.model.parent_path, model)
    return model


def _train_parent(cfg: RunConfig, model: torch.nn.Module, data: DatasetSplits, progress: Progress) -> None:
    if cfg.model.parent_path:
        progress(f"[parent] loaded {cfg.model.parent_path} ({count_parameters(model):,} parameters)")
        return
    progress(f"[parent] training {count_parameters(model):,} parameters for {cfg.parent.epochs} epochs "
             f"on {len(data.train):,} samples")

    def report(epoch: int, loss: float, seconds: float) -> None:
        val = classification_metrics(predict_probs(model, data.validation.x), data.validation.y)
        model.train()
        progress(f"[parent] epoch {epoch + 1}/{cfg.parent.epochs}  loss {loss:.4f}  "
                 f"val acc {val['accuracy']:.4f}  val nll {val['nll']:.4f}  ({seconds:.1f}s)")

    train(model, data.train, cfg.parent, seed=cfg.seed, on_epoch=report)


def _finetune(cfg: RunConfig, data: DatasetSplits, states: list[dict], progress: Progress) -> list[dict]:
    tuned = []
    for i, state in enumerate(states):
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        model.load_state_dict(state)
        train(model, data.train, cfg.finetune, seed=cfg.seed + 1 + i)
        tuned.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        progress(f"[finetune] member {i + 1}/{len(states)} done")
    return tuned


def _generation_line(search: SubnetworkSearch, cfg: RunConfig, seconds: float) -> str:
    latest = [r for r in search.records if r.generation == search.generation - 1]
    ranked = sorted(latest, key=lambda r: rank_key(r, cfg.search.fitness))
    best, median, worst = ranked[0], ranked[len(ranked) // 2], ranked[-1]
    return (f"[search] generation {search.generation}/{cfg.search.generations}  val {cfg.search.fitness}: "
            f"best {best.fitness:.4f}  median {median.fitness:.4f}  worst {worst.fitness:.4f}  "
            f"elite best {search.elites[0].fitness:.4f}  "
            f"({len(latest)} candidates in {seconds:.1f}s, {len(latest) / seconds:.1f}/s)")


def _summary_table(metrics: dict) -> str:
    best = metrics["members"][0]
    rows = [("parent", metrics["parent"]), ("best member", best),
            (f"ensemble ({len(metrics['members'])})", metrics["ensemble"])]
    lines = [f"{'test split':<16}{'accuracy':>10}{'nll':>10}{'ece':>10}"]
    lines += [f"{name:<16}{m['accuracy']:>10.4f}{m['nll']:>10.4f}{m['ece']:>10.4f}" for name, m in rows]
    return "\n".join(lines)


def run(config: RunConfig | dict | str | Path, overrides: list[str] | None = None, *,
        progress: Progress = print) -> RunResult:
    """Run a whole search from a :class:`RunConfig`, a nested dict or a YAML path, plus ``key=value``
    overrides (not applied to a ready :class:`RunConfig`)."""
    config_name = "run"
    if isinstance(config, dict):
        cfg = config_from_dict(apply_overrides(copy.deepcopy(config), overrides or []))
    elif isinstance(config, RunConfig):
        cfg = config
    else:
        config_name = Path(config).stem
        cfg = load_config(config, overrides)
    logging.getLogger("evotorch").setLevel(logging.WARNING)  # its per-problem INFO lines drown the progress
    started = time.perf_counter()
    data = load_dataset(cfg.data)
    parent = _build_parent(cfg, data)
    run_dir = create_run_dir(cfg, config_name)
    progress(f"[run] {run_dir}")
    progress(f"[data] {data.name}: train {len(data.train):,}  validation {len(data.validation):,}  "
             f"test {len(data.test):,}")
    _train_parent(cfg, parent, data, progress)
    parent.eval()
    parent_state = {k: v.detach().cpu().clone() for k, v in parent.state_dict().items()}
    write_state(run_dir / "parent.pt", parent_state)

    payload = EvaluationPayload(
        model=cfg.model, input_shape=data.input_shape, num_classes=data.num_classes, parent_state=parent_state,
        parent_id=parent_fingerprint(parent_state), children=cfg.children, val_x=data.validation.x,
        val_y=data.validation.y, batch_size=cfg.search.eval_batch_size, threads=cfg.workers.threads_per_actor,
        use_gpu=cfg.workers.num_gpus_per_actor > 0)
    family = make_family(cfg.children)
    problem = make_problem(cfg.workers, payload, fitness=cfg.search.fitness, population=cfg.search.population)
    search = SubnetworkSearch(problem, family, cfg.search, seed=cfg.seed)
    population_path = run_dir / "population.parquet"
    try:
        for _ in range(cfg.search.generations):
            step_started = time.perf_counter()
            search.step()
            seconds = time.perf_counter() - step_started
            write_population(population_path, _population_rows(search.records, family))
            if search.generation == 1:
                devices = problem.worker_devices()
                where = "in-process" if problem.actors is None else f"{len(devices)} Ray actors"
                progress(f"[workers] evaluating {where} on {', '.join(sorted(set(devices)))}")
            progress(_generation_line(search, cfg, seconds))
    finally:
        problem.close()

    members = select_members(search.records, cfg.ensemble.size, cfg.search.fitness)
    for record in members:
        record.is_member = True
    write_population(population_path, _population_rows(search.records, family))

    materialiser = CandidateEvaluator(payload)
    member_states = [materialiser.child_state(m.genome) for m in members]
    member_files: list[str | None] = [None] * len(members)
    if cfg.finetune.epochs > 0:
        member_states = _finetune(cfg, data, member_states, progress)
        (run_dir / "members").mkdir(exist_ok=True)
        for i, state in enumerate(member_states):
            member_files[i] = f"members/{i}.pt"
            write_state(run_dir / member_files[i], state)
    write_json(run_dir / "members.json", [
        {"candidate": m.candidate, "genome": m.genome, "weights": f, "val_accuracy": m.val_accuracy,
         "val_nll": m.val_nll} for m, f in zip(members, member_files)])

    # The test split is touched only here, after every selection decision has been made.
    test_x, test_y = data.test.x, data.test.y
    batch = cfg.search.eval_batch_size
    model = build_model(cfg.model, data.input_shape, data.num_classes).eval()
    member_probs = []
    for state in member_states:
        model.load_state_dict(state)
        member_probs.append(predict_probs(model, test_x, batch))
    ensemble_probs = torch.stack(member_probs).mean(dim=0)
    metrics = {
        "parent": classification_metrics(predict_probs(parent, test_x, batch), test_y),
        "ensemble": classification_metrics(ensemble_probs, test_y),
        "members": [dict(classification_metrics(p, test_y), candidate=m.candidate)
                    for p, m in zip(member_probs, members)],
        "test_samples": len(test_y),
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json(run_dir / "metrics.json", metrics)
    progress(_summary_table(metrics))
    progress(f"[run] results in {run_dir}")
    return RunResult(run_dir, metrics, pd.read_parquet(population_path), [m.genome for m in members])
