"""Quality study: each child family against the parent and matched-budget baselines, over several seeds.

Runs every config of one or more folders (one folder per dataset and model, e.g. ``configs/study/mnist1d``:
one config per method, the same data, model and parent) once per seed through
:func:`evo_subens.core.runner.run`, and prints per folder the mean +- standard error over seeds of test
accuracy, NLL and ECE, raw and temperature-scaled (fitted on validation), mean pairwise member
disagreement, in how many seeds the method beat the parent on both test accuracy and NLL, its training
epochs and its wall seconds. The parent row comes from the first subnetwork config's runs. Finished runs
are read back, so an interrupted study goes on where it stopped.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

from ..core.config import METHODS, load_config
from ..errors import UserError
from ..core.runner import run

COLUMNS = ("accuracy", "nll", "ece", "nll_ts", "ece_ts", "disagreement")


def mean_se(values: list[float]) -> str:
    """``mean +- standard error`` (the standard error is nan for a single value)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{mean:.4f} +- {se:.4f}"


def _row(metrics: dict, scaled: dict | None, disagreement: float | None, epochs: float, seconds: float,
         parent: dict | None) -> dict:
    beats = None
    if parent is not None:
        beats = metrics["accuracy"] > parent["accuracy"] and metrics["nll"] < parent["nll"]
    return dict({k: metrics[k] for k in ("accuracy", "nll", "ece")},
                nll_ts=scaled["nll"] if scaled else None, ece_ts=scaled["ece"] if scaled else None,
                disagreement=disagreement, beats_parent=beats, train_epochs=epochs, seconds=seconds)


def _ordered_configs(config_dir: Path, overrides: list[str]) -> list[tuple[Path, str]]:
    paths = sorted(config_dir.glob("*.yaml"))
    if not paths:
        raise UserError(f"no *.yaml config in {config_dir}")
    methods = {path: load_config(path, overrides).method for path in paths}  # validates all before any run
    return sorted(((p, m) for p, m in methods.items()), key=lambda pm: (METHODS.index(pm[1]), pm[0].stem))


def format_table(table: dict[str, list[dict]]) -> str:
    """One row per method: metrics as mean +- standard error over seeds, seeds beating the parent on test
    accuracy and NLL, training epochs (identical across seeds), mean wall seconds."""
    header = (f"{'method':<20}" + "".join(f"{c:>20}" for c in COLUMNS)
              + f"{'beats parent':>14}{'train epochs':>14}{'seconds':>10}")
    lines = [header]
    for name, rows in table.items():
        cells = []
        for column in COLUMNS:
            values = [r[column] for r in rows if r.get(column) is not None]
            cells.append(mean_se(values) if values else "-")
        verdicts = [r["beats_parent"] for r in rows if r.get("beats_parent") is not None]
        beats = f"{sum(verdicts)}/{len(verdicts)}" if verdicts else "-"
        seconds = statistics.fmean(r["seconds"] for r in rows)
        lines.append(f"{name:<20}" + "".join(f"{c:>20}" for c in cells)
                     + f"{beats:>14}{rows[0]['train_epochs']:>14g}{seconds:>10.0f}")
    return "\n".join(lines)


def _finished(output_dir: Path, name: str) -> dict | None:
    """metrics.json and wall seconds of a finished run of that name, else None."""
    path = output_dir / name / "metrics.json"
    timing = output_dir / name / "study-seconds.json"
    if path.is_file() and timing.is_file():
        return {"metrics": json.loads(path.read_text()), "seconds": json.loads(timing.read_text())}
    return None


def _run_once(path: Path, overrides: list[str], output_dir: Path, name: str) -> tuple[dict, float]:
    done = _finished(output_dir, name)
    if done is not None:
        return done["metrics"], done["seconds"]
    if (output_dir / name).exists():  # an interrupted run of the study: start it again from scratch
        import shutil

        shutil.rmtree(output_dir / name)
    started = time.perf_counter()
    result = run(path, overrides + [f"name={name}"], progress=lambda line: None)
    seconds = time.perf_counter() - started
    (output_dir / name / "study-seconds.json").write_text(json.dumps(seconds))
    return result.metrics, seconds


def quality(*, seeds: list[int], config_dir: str = "configs/study/mnist1d", data_root: str | None = None,
            output_dir: str = "runs/study", executor: str = "ray") -> dict[str, dict[str, list[dict]]]:
    """Run every config of each folder in ``config_dir`` (comma-separated) for every seed and print a table
    per folder; returns folder -> method -> per-seed rows."""
    started = time.perf_counter()
    folders = [Path(f) for f in config_dir.split(",") if f.strip()]
    tables = {}
    for folder in folders:
        out = Path(output_dir) / folder.name
        overrides = [f"output_dir={out}", f"workers.executor={executor}"]
        if data_root is not None:
            overrides.append(f"data.path={data_root}")
        configs = _ordered_configs(folder, overrides)
        table: dict[str, list[dict]] = defaultdict(list)
        for seed in seeds:
            parent = None
            for path, method in configs:
                metrics, seconds = _run_once(path, overrides + [f"seed={seed}"], out, f"{path.stem}-s{seed}")
                if method == "subnetworks" and parent is None:
                    parent = metrics["parent"]
                    scaled = (metrics.get("temperature") or {}).get("parent")
                    table["parent"].append(_row(parent, scaled and scaled["test"], None,
                                                load_config(path, overrides).parent.epochs, 0.0, None))
                spread = metrics["diversity"]["disagreement"]["mean"] if len(metrics["members"]) > 1 else None
                scaled = (metrics.get("temperature") or {}).get("ensemble")
                table[path.stem].append(_row(metrics["ensemble"], scaled and scaled["test"], spread,
                                             metrics["cost"]["train_epochs"], seconds, parent))
                print(f"[study] {folder.name} seed {seed} {path.stem}: accuracy "
                      f"{metrics['ensemble']['accuracy']:.4f}  nll {metrics['ensemble']['nll']:.4f}  "
                      f"({seconds:.0f}s)", flush=True)
        tables[folder.name] = dict(table)
    print(f"\ntest split, mean +- standard error over seeds {seeds}; {time.perf_counter() - started:.0f}s; "
          "'beats parent': seeds whose ensemble beat the parent on both test accuracy and NLL")
    for name, table in tables.items():
        print(f"\n{name}\n{format_table(table)}", flush=True)
    return tables
