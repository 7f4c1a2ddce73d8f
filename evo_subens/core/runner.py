"""Run, resume and grow: the public entry points of the engine.

A run is a function of its config and seed: :func:`run` starts one, :func:`resume` goes on from its last
checkpoint and ends with the same population log, members and metrics as a run that was never stopped,
and :func:`grow` adds members to a finished run. The stages themselves are in
:class:`~evo_subens.core.pipeline.Pipeline`; everything task-specific in the run's task.

    >>> import evo_subens
    >>> result = evo_subens.run("configs/default.yaml", ["search.generations=2"])
    >>> result.metrics["ensemble"]["nll"] < result.metrics["parent"]["nll"]
    >>> evo_subens.resume(result.run_dir, ["search.generations=4"])   # extend the finished search
    >>> evo_subens.grow(result.run_dir, members=4)                     # 4 more members
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ConfigError, RunDirError, UserError
from ..families import make_family
from ..tasks import make_task
from ..tasks.base import Progress, Task
from .checkpoint import load_latest_checkpoint
from .cluster import check_address, check_before_run
from .config import RunConfig, apply_overrides, config_from_dict, config_to_dict, load_config
from .logs import check_resume_compatible, read_run_config
from .pipeline import Pipeline
from .problem import prepare_workers
from .progress import after_generations, say, start_run_clock
from .rundir import create_run_dir, remove_stale_temp_files, write_run_config
from .state import RunResult, RunState
from .tracking import Tracker
from .worker import torch_threads

__all__ = ["RunResult", "grow", "resume", "run"]


def _build_parent(cfg: RunConfig, task: Task) -> torch.nn.Module:
    """The parent architecture, with the user's weights if given; fails fast on a bad model, layer
    pattern or parent file (before the run directory exists)."""
    torch.manual_seed(cfg.seed)
    model = task.new_model()
    make_family(cfg.children).bind(task.new_model())
    if cfg.model.parent_path:
        task.load_parent(cfg.model.parent_path, model)
    return model


def _load_config_arg(config: RunConfig | dict | str | Path, overrides: list[str] | None) -> tuple[RunConfig, str]:
    if isinstance(config, dict):
        return config_from_dict(apply_overrides(copy.deepcopy(config), overrides or [])), "run"
    if isinstance(config, RunConfig):
        return config, "run"
    return load_config(config, overrides), Path(config).stem


def _new_run_dir(cfg: RunConfig, config_name: str, task: Task) -> Path:
    run_dir = create_run_dir(cfg, config_name)
    task.record_data(run_dir)
    write_run_config(run_dir, cfg)  # with what record_data filled in (where in-memory data was saved)
    return run_dir


def run(config: RunConfig | dict | str | Path, overrides: list[str] | None = None, *, data: object = None,
        progress: Progress = say, trackers: Sequence[Tracker] = ()) -> RunResult:
    """Run a whole search from a :class:`RunConfig`, a nested dict or a YAML path, plus ``key=value``
    overrides (not applied to a ready :class:`RunConfig`).

    ``data``: the data in memory instead of the config's ``data.name`` / ``data.path``: ``(x, y)``,
    ``(x, y, x_test, y_test)``, a dict of those keys (numpy arrays, tensors or lists), a torch ``Dataset`` of
    (input, label) pairs or ``(train, test)`` Datasets. It is saved into the run directory (``data.npz``),
    so report, resume, grow and ``load_ensemble`` work as for data read from files.

    ``trackers``: more places each generation's statistics and the final metrics go, beside those the
    ``tracking`` section turns on (e.g. :func:`evo_subens.tune.trainable`'s reports to Ray Tune)."""
    start_run_clock()
    cfg, config_name = _load_config_arg(config, overrides)
    with torch_threads(cfg.workers.driver_threads):
        return _run(cfg, config_name, data, progress, trackers)


def _run(cfg: RunConfig, config_name: str, data: object, progress: Progress,
         trackers: Sequence[Tracker]) -> RunResult:
    check_before_run(cfg)
    task = make_task(cfg, progress)
    task.load(data)
    if cfg.method == "packed":  # one packed network cut from the parent: no workers, no search
        task.check_baseline()
        parent = _build_parent(cfg, task)
        return task.run_packed(_new_run_dir(cfg, config_name, task), parent)
    if cfg.method != "subnetworks":  # a matched-budget baseline: the same kind of run directory, no search
        task.check_baseline()
        return task.run_baseline(_new_run_dir(cfg, config_name, task))
    parent = _build_parent(cfg, task)
    prepare_workers(cfg.workers, progress)  # Ray up and the actors placeable before training or the run dir
    run_dir = _new_run_dir(cfg, config_name, task)
    return Pipeline(cfg, run_dir, task, parent, None, progress, trackers).run()


def resume(run_dir: str | Path, overrides: list[str] | None = None, *, progress: Progress = say,
           trackers: Sequence[Tracker] = ()) -> RunResult:
    """Go on with ``run_dir`` from its newest usable checkpoint.

    Compatible overrides: ``search.generations`` (to extend a search) and ``workers.*`` (actors, GPUs,
    cluster address); anything else would make it another run and is refused.
    """
    start_run_clock()
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    check_resume_compatible(saved, apply_overrides(copy.deepcopy(saved), overrides or []), run_dir)
    cfg = config_from_dict(apply_overrides(copy.deepcopy(saved), overrides or []))
    # Compared with its defaults filled in: fields added since the run started keep their defaults, which
    # reproduce what the run did before they existed.
    check_resume_compatible(config_to_dict(config_from_dict(saved)), config_to_dict(cfg), run_dir)
    check_address(cfg.workers)
    with torch_threads(cfg.workers.driver_threads):
        return _resume(run_dir, cfg, saved, progress, trackers)


def _resume(run_dir: Path, cfg: RunConfig, saved: dict, progress: Progress, trackers: Sequence[Tracker]) -> RunResult:
    task = make_task(cfg, progress)
    if cfg.method == "packed":  # goes on after the last candidate its checkpoint names
        task.load()
        task.check_data(run_dir)
        for path in remove_stale_temp_files(run_dir):
            progress(f"[resume] removed {path.name}, left by an interrupted write")
        return task.run_packed(run_dir, _build_parent(cfg, task))
    if cfg.method != "subnetworks":  # baselines keep no checkpoints; run again, they give the same result
        task.load()
        task.check_data(run_dir)
        return task.run_baseline(run_dir)
    checkpoint = load_latest_checkpoint(run_dir, progress)
    state = RunState.from_dict(checkpoint) if checkpoint is not None else None
    if state is not None and state.search and cfg.search.generations < state.search["generation"]:
        raise ConfigError("search.generations", f"at least the {state.search['generation']} generations "
                                                f"{run_dir} has already run", cfg.search.generations)
    if state is not None and state.search and cfg.search.generations > saved["search"]["generations"]:
        progress(_extension_note(cfg, state.search, run_dir))
    task.load()
    task.check_data(run_dir)
    parent = _build_parent(cfg, task)
    prepare_workers(cfg.workers, progress)
    for path in remove_stale_temp_files(run_dir):
        progress(f"[resume] removed {path.name}, left by an interrupted write")
    if cfg != config_from_dict(saved):
        write_run_config(run_dir, cfg)
    return Pipeline(cfg, run_dir, task, parent, state, progress, trackers).run()


def _extension_note(cfg: RunConfig, search: dict, run_dir: Path) -> str:
    """What ``resume ... search.generations=G`` runs: the same as a run configured with G generations, so an
    early stop (``search.patience``) holds there as it would have from the start."""
    ran, planned, patience = search["generation"], cfg.search.generations, cfg.search.patience
    if search.get("stopped"):
        return (f"[resume] search.generations={planned} adds no generation: the search stopped early "
                f"{after_generations(ran)} ({patience} generation(s) without a better best candidate, "
                f"search.patience), as a run configured with {planned} would have; to search past an early "
                f"stop: evo-subens grow {run_dir} --generations N --members M")
    if not patience:
        return f"[resume] the search goes on from {ran} to {planned} generations"
    return (f"[resume] the search goes on from {ran} to {planned} generations unless it stops early: "
            f"search.patience={patience} ends it after {patience} generation(s) in a row without a better best "
            f"candidate ({search.get('stalled', 0)} so far), as in a run configured with {planned} generations")


def grow(run_dir: str | Path, members: int, *, generations: int = 1, progress: Progress = say) -> RunResult:
    """Add up to ``members`` members to a finished run: evolve ``generations`` more generations from where
    the search stopped, keep the current members and offer the best new distinct candidates to the
    ensemble (fine-tuned and accepted as in a run)."""
    start_run_clock()
    run_dir = Path(run_dir)
    if members < 1 or generations < 0:
        raise UserError(f"grow needs --members >= 1 and --generations >= 0 (got {members} and {generations})")
    method = read_run_config(run_dir).get("method", "subnetworks")
    if method != "subnetworks":
        what = "packed run (its members are one network's share of the parent)" if method == "packed" else \
            f"{method} baseline run"
        raise UserError(f"{run_dir} is a {what}; only subnetwork runs can grow")
    checkpoint = load_latest_checkpoint(run_dir, progress)
    if checkpoint is None or checkpoint["stage"] != "done":
        raise RunDirError(f"{run_dir} has not finished; resume it first (evo-subens resume {run_dir})")
    state = RunState.from_dict(checkpoint)
    cfg = config_from_dict(read_run_config(run_dir))
    if cfg.search.scoring == "tuned":
        raise UserError(f"{run_dir} chose its ensemble from tuned candidates (search.scoring: tuned), which grow "
                        f"does not extend; resume it with more generations instead (evo-subens resume {run_dir} "
                        f"search.generations=N)")
    with torch_threads(cfg.workers.driver_threads):
        return _grow(run_dir, cfg, state, members, generations, progress)


def _grow(run_dir: Path, cfg: RunConfig, state: RunState, members: int, generations: int,
          progress: Progress) -> RunResult:
    accepted = state.ensemble
    before = {"search.generations": cfg.search.generations, "ensemble.size": cfg.ensemble.size}
    ran = state.search["generation"]
    cfg.search.generations = ran + generations
    cfg.ensemble.size = len(accepted) + members
    task = make_task(cfg, progress)
    task.load()
    task.check_data(run_dir)
    parent = _build_parent(cfg, task)
    prepare_workers(cfg.workers, progress)
    write_run_config(run_dir, cfg)
    after = {"search.generations": cfg.search.generations, "ensemble.size": cfg.ensemble.size}
    searched = (f"{generations} more search generation(s) (generation {ran}" + (f" to {ran + generations - 1}"
                if generations > 1 else "") + ")") if generations else "no more search generations"
    changed = ", ".join(f"{key} {before[key]} -> {after[key]}" for key in after if before[key] != after[key])
    progress(f"[grow] {len(accepted)} members + up to {members} new: {searched}, then the best new distinct "
             f"candidates fine-tuned and offered to the ensemble; config.yaml: {changed or 'unchanged'}")
    # The user asked for more generations: an early stop of the search does not hold for them.
    state.search = dict(state.search, stopped=False, stalled=0)
    state.stage, state.grow, state.accepted = "search", members, accepted
    return Pipeline(cfg, run_dir, task, parent, state, progress).run()
