"""Reading run directories back: configs, population logs for pandas, resume compatibility.

    >>> import evo_subens
    >>> pop = evo_subens.load_population("runs/default-s0-20261126-033727")
    >>> pop.groupby("generation")["val_nll"].min()
    >>> runs = evo_subens.load_runs("runs")        # every run, config flattened into columns
    >>> runs.groupby(["children.density", "children.sigma"])["val_nll"].median()
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pyarrow

from .config import DEFAULT_FAMILY, ChildrenConfig, family_section
from .options import parse_yaml
from ..errors import RunDirError, UserError
from ..tasks import unused_sections
from .rundir import POPULATION_SCHEMA, population_schema

# Population-log columns added after the first release, with the value older logs mean by them.
ADDED_COLUMNS = {"node": "", "raced": False, "diverged": False, "step_scale": 1.0, "ensemble_nll": float("nan"),
                 "host": "", "finished_at": None}

# Fields a resume may change: how long the search runs and where/how it is evaluated.
RESUMABLE_CHANGES = ("search.generations", "workers.", "tracking.", "name", "output_dir")

# Fields whose default changed behaviour when they were added: a run directory written before them
# did what these values do, so they fill in for the missing keys (other new fields' defaults already
# reproduce the old behaviour).
LEGACY_VALUES: dict[tuple[str, str], object] = {
    ("search", "step_size"): "constant",
    ("search", "patience"): 0,
    ("ensemble", "acceptance"): False,
    ("ensemble", "holdout"): 0.0,
    ("search", "scoring"): "raw",
}
# Fields renamed since: a run directory's old name reads as the new one.
LEGACY_NAMES: dict[tuple[str, str], str] = {("data", "root"): "path"}


def read_run_config(run_dir: str | Path) -> dict:
    """The resolved config a run directory was started with, as a nested dict."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise RunDirError(f"run directory {run_dir} {what}; expected a run's folder (<output_dir>/<name>, "
                          f"holding config.yaml)")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory: {path.name} is missing")
    try:
        data = parse_yaml(path.read_text())
    except Exception as exc:
        raise RunDirError(f"{path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} does not hold a config mapping")
    for (section, old), new in LEGACY_NAMES.items():
        if isinstance(data.get(section), dict) and old in data[section]:
            data[section][new] = data[section].pop(old)
    for (section, name), value in LEGACY_VALUES.items():
        if isinstance(data.get(section), dict) and name not in data[section]:
            data[section][name] = value
    drop_other_families_fields(data)
    return data


def drop_other_families_fields(data: dict) -> dict:
    """Drop from a saved config's ``children`` the fields of families other than its own, in place.

    Run directories written while every family shared one flat ``children`` section hold every family's
    fields (22 of them); only the run's own family read its fields, the others had no effect. The
    section of a family now holds its own fields only, so those are all a saved config keeps.
    """
    children = data.get("children")
    if not isinstance(children, dict):
        return data
    try:
        own = {f.name for f in dataclasses.fields(family_section(children.get("family", DEFAULT_FAMILY)))}
    except UserError:
        return data  # an unknown family: building the config names it
    others = {f.name for _, section in ChildrenConfig.section_variants() for f in dataclasses.fields(section)}
    for name in [name for name in children if name not in own and name in others]:
        del children[name]
    return data


def flatten_config(data: dict, prefix: str = "") -> dict:
    """``{"search": {"population": 8}}`` -> ``{"search.population": 8}`` (lists and dicts of kwargs as is)."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name != "model.kwargs":
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_columns(config: dict, all_columns: bool = False) -> dict:
    """A run's config flattened (``search.population``), without the sections its task and method do not
    read (see :func:`~evo_subens.tasks.unused_sections`) unless ``all_columns``."""
    flat = flatten_config(config)
    if all_columns:
        return flat
    unused = unused_sections(flat.get("task", "classification"), flat.get("method", "subnetworks"))
    return {key: value for key, value in flat.items() if key.split(".", 1)[0] not in unused}


def check_resume_compatible(saved: dict, new: dict, run_dir: Path) -> None:
    """Refuse changes that would make a resumed run a different run (model, data, family, seed, ...)."""
    before, after = flatten_config(saved), flatten_config(new)
    for key in sorted(set(before) | set(after)):
        if key.startswith(RESUMABLE_CHANGES) or before.get(key) == after.get(key):
            continue
        raise RunDirError(f"cannot resume {run_dir} with {key}={after.get(key)!r} (the run has "
                          f"{before.get(key)!r}): that would be a different run; start a new one instead. "
                          f"Resume may change search.generations, workers.* and tracking.*")


def _logged_family(run_dir: Path) -> type | None:
    """The :class:`~evo_subens.families.Family` class of the run in ``run_dir``; None when its config does
    not say (no or an unreadable config.yaml, a family not registered in this process)."""
    if not (run_dir / "config.yaml").is_file():
        return None
    from ..families import family_class  # here, not at the top: the families import the config

    try:
        children = read_run_config(run_dir).get("children") or {}
        return family_class(children.get("family", DEFAULT_FAMILY))
    except (UserError, AttributeError):
        return None


def _logged_metrics(run_dir: Path) -> list[str]:
    """Names of the validation metrics the run's task logs (``val_<name>`` columns)."""
    from ..tasks import TASKS, task_metrics

    task = read_run_config(run_dir).get("task", "classification")
    if task not in TASKS:
        raise RunDirError(f"{run_dir}: its task {task!r} is not registered here (known: {', '.join(TASKS)})")
    return [m.name for m in task_metrics(task)]


def load_population(run_dir: str | Path) -> pd.DataFrame:
    """The population log of a run: one row per evaluated candidate.

    Columns and dtypes are :func:`evo_subens.core.rundir.population_schema` of the run's family (its log
    columns after ``parent``); ``eval_seconds``, ``finished_at``, ``worker``, ``node`` and ``host``
    record where, when and how fast a candidate ran, everything else is a function of the config. Logs of a family whose columns changed
    are read with today's names (``Family.legacy_log_columns``).
    """
    path = Path(run_dir) / "population.parquet"
    if not path.is_file():
        raise RunDirError(f"{path} does not exist (the run has not finished a generation yet)")
    try:
        frame = pd.read_parquet(path)
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        raise RunDirError(f"population log {path} is unreadable ({exc})") from None
    for column, value in ADDED_COLUMNS.items():  # logs written before the column existed
        if column not in frame.columns:
            frame[column] = pd.Series([value] * len(frame), dtype=POPULATION_SCHEMA[column])
    family = _logged_family(Path(run_dir))
    schema = POPULATION_SCHEMA
    if family is not None:
        renamed = {old: new for old, new in family.legacy_log_columns.items()
                   if old in frame.columns and new not in frame.columns}
        frame = family.complete_log(frame.rename(columns=renamed))
        schema = population_schema(family.log_columns, _logged_metrics(Path(run_dir)))
    missing = set(schema) - set(frame.columns)
    if missing:
        raise RunDirError(f"population log {path} lacks columns {sorted(missing)}")
    return frame[list(schema)] if family is not None else frame


def load_runs(runs_dir: str | Path = "runs", *, all_columns: bool = False) -> pd.DataFrame:
    """The population logs of every run under ``runs_dir``, with a ``run`` column and the run's config
    flattened into columns (``search.population``, ``children.sigma``, ...) for ``groupby``.

    A run's columns are the config fields it reads: its task's sections (a classification run has no
    ``env.*``, ``ppo.*`` or ``policy.*``), its family's ``children.*`` fields, and ``baseline.*`` only for a
    baseline. Runs that differ in these get the union, empty where a run has no such field.
    ``all_columns=True`` keeps every field of every run's config.

        >>> runs = evo_subens.load_runs("runs")
        >>> runs[runs.generation >= 0].groupby(["run", "children.sigma"])["val_nll"].min()
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise RunDirError(f"runs folder {runs_dir} does not exist")
    frames = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if (p / "population.parquet").is_file()):
        frame = load_population(run_dir)
        config = config_columns(read_run_config(run_dir), all_columns)
        frame.insert(0, "run", run_dir.name)
        for key, value in config.items():
            frame[key] = str(value) if isinstance(value, (list, dict)) else value
        frames.append(frame)
    if not frames:
        raise RunDirError(f"no run with a population log under {runs_dir}")
    return pd.concat(frames, ignore_index=True)
