"""Quality benchmark: the subnetwork method against matched-budget baselines, over several seeds.

Runs every config of a folder (default ``configs/bench/``: one per method, the same data, model and
training budget) once per seed through :func:`evo_subens.runner.run`, and prints mean +- standard
error over seeds of test accuracy, NLL, ECE and mean pairwise member disagreement, next to each
method's cost (training epochs and sample-passes, evaluation forward passes). The parent row comes
from the subnetwork runs' ``metrics["parent"]``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

from ..config import METHODS, load_config
from ..cost import cost_record
from ..data import load_dataset
from ..errors import UserError
from ..runner import run

COLUMNS = ("accuracy", "nll", "ece", "disagreement")
COSTS = ("train_epochs", "train_sample_passes", "eval_forward_passes")


def mean_se(values: list[float]) -> str:
    """``mean +- standard error`` (the standard error is nan for a single value)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{mean:.4f} +- {se:.4f}"


def _row(metrics: dict, disagreement: float | None, cost: dict) -> dict:
    return dict({k: metrics[k] for k in ("accuracy", "nll", "ece")}, disagreement=disagreement, **cost)


def _ordered_configs(config_dir: Path, overrides: list[str]) -> list[tuple[Path, str]]:
    paths = sorted(config_dir.glob("*.yaml"))
    if not paths:
        raise UserError(f"no *.yaml config in {config_dir}")
    methods = {path: load_config(path, overrides).method for path in paths}  # validates all before any run
    return sorted(((p, m) for p, m in methods.items()), key=lambda pm: (METHODS.index(pm[1]), pm[0].stem))


def format_table(table: dict[str, list[dict]]) -> str:
    """The benchmark table: one row per method, metrics as mean +- standard error over seeds, costs
    (identical across seeds) as numbers."""
    header = (f"{'method':<16}" + "".join(f"{c:>20}" for c in COLUMNS)
              + f"{'train epochs':>14}{'train passes':>14}{'eval passes':>14}")
    lines = [header]
    for name, rows in table.items():
        cells = []
        for column in COLUMNS:
            values = [r[column] for r in rows if r[column] is not None]
            cells.append(mean_se(values) if values else "-")
        costs = [rows[0][c] for c in COSTS]
        lines.append(f"{name:<16}" + "".join(f"{c:>20}" for c in cells)
                     + f"{costs[0]:>14g}{costs[1]:>14,}{costs[2]:>14,}")
    return "\n".join(lines)


def quality(*, seeds: list[int], config_dir: str = "configs/bench", data_root: str | None = None,
            output_dir: str = "runs/bench-quality", executor: str = "ray") -> dict[str, list[dict]]:
    """Run every config in ``config_dir`` for every seed, print the table; returns per-method rows."""
    started = time.perf_counter()
    overrides = [f"output_dir={output_dir}", f"workers.executor={executor}"]
    if data_root is not None:
        overrides.append(f"data.root={data_root}")
    configs = _ordered_configs(Path(config_dir), overrides)
    table: dict[str, list[dict]] = defaultdict(list)
    for seed in seeds:
        for path, method in configs:
            run_started = time.perf_counter()
            result = run(path, overrides + [f"seed={seed}"], progress=lambda line: None)
            metrics = result.metrics
            if method == "subnetworks":
                cfg = load_config(result.run_dir / "config.yaml")
                data = load_dataset(cfg.data)
                epochs = cfg.parent.epochs
                table["parent"].append(_row(metrics["parent"], None, cost_record(
                    epochs, epochs * len(data.train), len(data.test))))
            spread = metrics["diversity"]["disagreement"]["mean"] if len(metrics["members"]) > 1 else None
            table[path.stem].append(_row(metrics["ensemble"], spread, metrics["cost"]))
            print(f"[bench] seed {seed} {path.stem}: accuracy {metrics['ensemble']['accuracy']:.4f}  "
                  f"nll {metrics['ensemble']['nll']:.4f}  ({time.perf_counter() - run_started:.0f}s, "
                  f"{result.run_dir})", flush=True)
    print(f"\ntest split, mean +- standard error over seeds {seeds}; configs {config_dir}; "
          f"{time.perf_counter() - started:.0f}s")
    print(format_table(table), flush=True)
    return dict(table)
