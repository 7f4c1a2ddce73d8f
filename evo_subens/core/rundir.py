"""The run directory ``runs/<name>/``: the source of truth of a run, written atomically.

Layout::

    config.yaml          resolved config (every field, defaults included)
    parent.pt            parent state_dict (loads with ``torch.load(..., weights_only=True)``)
    population.parquet   one row per evaluated candidate (see population_schema)
    members.json         member genomes in selection order (+ weight files of fine-tuned members)
    members/<i>.pt       state_dict of fine-tuned member i (only when finetune.epochs > 0)
    metrics.json         test metrics: parent, members, ensemble
    incidents.json       lost workers (actor restarted by Ray, its candidates evaluated again)
    checkpoints/         ckpt-<seq>.pt, the newest few (see checkpoint.py)
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
import yaml

from .config import RunConfig, config_to_dict
from ..errors import ConfigError, RunDirError

# Column -> pandas dtype of population.parquet, the columns every run has: the child family's own columns
# (Family.log_columns) come after "parent". Stable names: analyses and later tools rely on them.
POPULATION_SCHEMA: dict[str, str] = {
    "generation": "int64",      # generation the candidate was evaluated in (0-based)
    "candidate": "int64",       # run-wide candidate id, in evaluation order
    "parent": "int64",          # candidate id of the genome it extends; -1 = the trained parent
    "fitness": "float64",       # the selection metric (search.fitness); the task's val_<metric> columns follow
    "is_elite": "bool",         # kept as an elite at the end of its own generation
    "is_member": "bool",        # selected into the final ensemble
    "eval_seconds": "float64",  # wall time of its evaluation inside the worker
    "worker": "string",         # 'actor-<i>' or 'local'
    "node": "string",           # Ray node id of the process that evaluated it; 'local' = the driver's process
    "host": "string",           # IP address of that node ('ray list nodes' names it); 'local' = the driver's
    "finished_at": "datetime64[ns, UTC]",  # wall-clock time its evaluation ended
    "raced": "bool",            # search.racing stopped its scoring early (it could not rank): metrics are NaN
    "diverged": "bool",         # its validation metrics were NaN or infinite (logged as NaN): never elite/member
    "step_scale": "float64",    # multiple of the configured perturbation strength it was made with
    "ensemble_nll": "float64",  # search.scoring tuned: selection NLL of the ensemble so far with it added
    "genome": "string",         # the full genome (JSON), materialises the candidate exactly
}
_FAMILY_COLUMNS_AFTER = "parent"


def population_schema(family_columns: dict[str, str], metrics: Sequence[str]) -> dict[str, str]:
    """Columns and dtypes of a population log: :data:`POPULATION_SCHEMA` with the task's validation metrics
    (``val_<name>``, float64) after ``fitness`` and the child family's columns (name -> dtype, e.g.
    ``NoisyFamily.log_columns``) after ``parent``."""
    metric_columns = {f"val_{name}": "float64" for name in metrics}
    clash = set(family_columns) & (set(POPULATION_SCHEMA) | set(metric_columns))
    if clash:
        raise ValueError(f"family log columns {sorted(clash)} clash with the population log's own columns")
    schema: dict[str, str] = {}
    for column, dtype in POPULATION_SCHEMA.items():
        schema[column] = dtype
        if column == _FAMILY_COLUMNS_AFTER:
            schema.update(family_columns)
        if column == "fitness":
            schema.update(metric_columns)
    return schema


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``os.umask`` can only be read
    by setting it, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file via a temp file in the same folder, flush + fsync, then rename over ``path``.

    The file gets the permissions ``open()`` would give it (0o666 less the umask), not the temp file's
    owner-only ones, so a run on shared storage can be read as the user's other files can."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete temp files a killed write left behind (never a finished file); returns what was removed."""
    stale = [p for p in Path(run_dir).rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink()
    return stale


def write_text(path: Path, text: str) -> None:
    """Atomically write a text file."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, data: Any) -> None:
    """Atomically write JSON (indented, keys in insertion order)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Atomically write a ``state_dict`` (tensors only, so it loads with ``weights_only=True``)."""
    atomic_write(path, lambda f: torch.save(state, f))


def population_frame(rows: list[dict], family_columns: dict[str, str], metrics: Sequence[str]) -> pd.DataFrame:
    """The population log as a DataFrame with :func:`population_schema`'s columns and dtypes."""
    schema = population_schema(family_columns, metrics)
    frame = pd.DataFrame(rows, columns=list(schema))
    # Records hold seconds since the epoch (NaN: not known, e.g. rows from before the column existed).
    frame["finished_at"] = pd.to_datetime(frame["finished_at"].astype("float64"), unit="s", utc=True)
    return frame.astype(schema)


def write_population(path: Path, rows: list[dict], family_columns: dict[str, str], metrics: Sequence[str]) -> None:
    """Atomically write the population log as Parquet (``family_columns``: the family's log columns;
    ``metrics``: the task's validation metric names)."""
    frame = population_frame(rows, family_columns, metrics)
    atomic_write(path, lambda f: frame.to_parquet(f, index=False))


def default_run_name(config_name: str, seed: int) -> str:
    """``<config>-s<seed>-<YYYYmmdd-HHMMSS>``."""
    return f"{config_name}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def _claim_dir(root: Path, name: str | None, config_name: str, seed: int) -> Path:
    """Create the run directory; ``mkdir`` without ``exist_ok`` makes the claim atomic between processes."""
    if name:
        run_dir = root / name
        try:
            run_dir.mkdir()
        except FileExistsError:
            if any(run_dir.iterdir()):
                raise RunDirError(f"run directory {run_dir} already exists and is not empty; choose another "
                                  f"name (name=...) or remove it") from None
        return run_dir
    base = default_run_name(config_name, seed)
    for attempt in itertools.count(1):
        run_dir = root / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue  # another run of the same config started in the same second
    raise AssertionError("unreachable")


def check_run_name(name: str | None) -> None:
    """Refuse a run name that is not one folder name: it would put the run outside ``output_dir``."""
    if name is None:
        return
    bad = (name in ("", ".", "..") or "/" in name or (os.altsep is not None and os.altsep in name)
           or "\0" in name or os.path.isabs(name))
    if bad:
        raise ConfigError("name", "one folder name, created under output_dir (no '/', '.', '..' or absolute "
                                  "path)", name)


def check_output_folder(output_dir: str) -> None:
    """Refuse an ``output_dir`` that is not a folder and cannot become one, without creating anything.

    The nearest existing ancestor must be a folder in which this process can create folders (probed
    with a temporary folder, removed at once: permission bits do not tell for root or for /proc).
    """
    path = Path(output_dir)
    if path.exists():
        if not path.is_dir():
            raise ConfigError("output_dir", f"a folder to hold run directories ({path} is a file)", output_dir)
        probe_in = path
    else:
        probe_in = next(p for p in path.absolute().parents if p.exists())
        if not probe_in.is_dir():
            raise ConfigError("output_dir", f"a folder to hold run directories ({probe_in} is a file, so "
                                            f"{path} cannot be created)", output_dir)
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe_in, prefix=".evo-subens-probe-"))
    except OSError as exc:
        raise ConfigError("output_dir", f"a folder this process can write run directories into (cannot "
                                        f"create folders in {probe_in}: {exc.strerror or exc})",
                          output_dir) from None


# The run directories this process created, newest last: the CLI names the newest when a run is interrupted.
created_run_dirs: list[Path] = []


def create_run_dir(cfg: RunConfig, config_name: str = "run") -> Path:
    """Create ``output_dir/name`` (refusing a non-empty one) and write the resolved config into it."""
    check_run_name(cfg.name)
    root = Path(cfg.output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        run_dir = _claim_dir(root, cfg.name, config_name, cfg.seed)
    except (FileExistsError, NotADirectoryError, FileNotFoundError, PermissionError) as exc:
        # check_output_folder refuses these up front; a folder changed since then still gets a clear error
        raise RunDirError(f"cannot create a run directory under output_dir {root} "
                          f"({exc.strerror or exc}: {exc.filename})") from None
    created_run_dirs.append(run_dir)
    write_run_config(run_dir, cfg)
    return run_dir


def used_config(cfg: RunConfig) -> dict:
    """The resolved config as a run records it: ``model.name`` is left out where ``model.architecture`` is
    set, since that model is never built and the record holds what was used."""
    resolved = config_to_dict(cfg)
    if resolved["model"].get("architecture"):
        resolved["model"] = {k: v for k, v in resolved["model"].items() if k != "name"}
    return resolved


def write_run_config(run_dir: Path, cfg: RunConfig) -> None:
    """Write :func:`used_config` (with the run directory's name) as ``config.yaml``."""
    resolved = dict(used_config(cfg), name=Path(run_dir).name)
    write_text(Path(run_dir) / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
