"""Loop bench: does the population loop beat the simple arms at the same training budget?

Each folder holds one config per arm on the same data, parent and budget (epochs summed over every model
trained), ``loop.yaml`` being the loop under test; e.g. ``configs/study/loop/mnist1d``: the loop (tuned
scoring), generation 0 with the pre-tune top-k, random children fine-tuned, copies of the parent
fine-tuned, one model, MC dropout. Every arm runs once per seed (finished runs are read back, so an
interrupted bench goes on where it stopped) and the table gives, per arm, test accuracy and NLL and
held-back validation NLL as mean +- standard error over seeds, and the paired difference of the arm
minus the loop (seed by seed: the noise the arms share cancels) as mean +- its standard error.

    evo-subens bench loop --configs configs/study/loop/mnist1d --seeds 0,1,2,3,4
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from ..errors import UserError
from .quality import _ordered_configs, _run_once, mean_se

REFERENCE = "loop"


def _cells(metrics: dict) -> dict[str, float | None]:
    """Test accuracy and NLL, held-back validation NLL (None where the run holds nothing back)."""
    held = (metrics.get("holdout") or {}).get("ensemble") or {}
    return {"accuracy": metrics["ensemble"]["accuracy"], "nll": metrics["ensemble"]["nll"],
            "holdout_nll": held.get("nll")}


def _generation_minimum(metrics: dict) -> int | None:
    """The generation whose ensemble had the lowest held-back NLL (tuned scoring runs), else None."""
    checks = [c for c in (metrics.get("search") or {}).get("generations", []) if c.get("holdout_ensemble_nll")]
    if not checks:
        return None
    return min(checks, key=lambda c: c["holdout_ensemble_nll"])["generation"]


def paired(values: list[float], reference: list[float]) -> str:
    """``mean +- SE`` of the seed-by-seed differences ``values - reference`` (and how many SEs from 0)."""
    diffs = [v - r for v, r in zip(values, reference)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.4f}"
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{mean:+.4f} +- {se:.4f} ({mean / se:+.1f} SE)" if se > 0 else f"{mean:+.4f} +- 0"


def format_loop_table(rows: dict[str, list[dict]]) -> str:
    """Per arm: mean +- SE of each cell, the paired difference (arm - loop) of test and held-back NLL and
    of test accuracy, the budget in epochs."""
    reference = rows.get(REFERENCE)
    header = (f"{'arm':<14}{'test acc':>18}{'test nll':>18}{'held-back nll':>18}"
              f"{'d acc vs loop':>30}{'d nll vs loop':>30}{'d held nll vs loop':>30}{'epochs':>8}")
    lines = [header]
    for arm, runs in rows.items():
        cells = []
        for key in ("accuracy", "nll", "holdout_nll"):
            values = [r[key] for r in runs if r[key] is not None]
            cells.append(mean_se(values) if values else "-")
        diffs = []
        for key in ("accuracy", "nll", "holdout_nll"):
            if arm == REFERENCE or reference is None or any(r[key] is None for r in runs + reference):
                diffs.append("-")
            else:
                diffs.append(paired([r[key] for r in runs], [r[key] for r in reference]))
        lines.append(f"{arm:<14}" + "".join(f"{c:>18}" for c in cells) + "".join(f"{d:>30}" for d in diffs)
                     + f"{runs[0]['epochs']:>8g}")
    return "\n".join(lines)


def loop_bench(*, seeds: list[int], config_dirs: str = "configs/study/loop/mnist1d", data_root: str | None = None,
               output_dir: str = "runs/bench-loop", executor: str = "ray") -> dict[str, dict[str, list[dict]]]:
    """Run every arm of each folder for every seed; print one table per folder and, for the loop, in how
    many seeds the ensemble's held-back NLL was lowest after generation 0. Returns folder -> arm -> rows."""
    started = time.perf_counter()
    tables = {}
    for folder in [Path(f) for f in config_dirs.split(",") if f.strip()]:
        if not (folder / f"{REFERENCE}.yaml").is_file():
            raise UserError(f"{folder} has no {REFERENCE}.yaml: the loop every other arm is compared with")
        out = Path(output_dir) / folder.name
        overrides = [f"output_dir={out}", f"workers.executor={executor}"]
        if data_root is not None and "fashion" in folder.name:
            overrides.append(f"data.path={data_root}")
        arms = sorted(_ordered_configs(folder, overrides), key=lambda pm: pm[0].stem != REFERENCE)
        rows: dict[str, list[dict]] = {}
        for seed in seeds:
            for path, _ in arms:
                metrics, seconds = _run_once(path, overrides + [f"seed={seed}"], out, f"{path.stem}-s{seed}")
                row = dict(_cells(metrics), epochs=metrics["cost"]["train_epochs"], seconds=seconds,
                           best_generation=_generation_minimum(metrics))
                rows.setdefault(path.stem, []).append(row)
                held = row["holdout_nll"]
                print(f"[bench loop] {folder.name} seed {seed} {path.stem}: test acc {row['accuracy']:.4f}  nll "
                      f"{row['nll']:.4f}  held-back nll {held if held is None else round(held, 4)}  "
                      f"({seconds:.0f}s)", flush=True)
        tables[folder.name] = rows
    print(f"\nmean +- standard error over seeds {seeds}; d = arm - loop, paired by seed; "
          f"{time.perf_counter() - started:.0f}s")
    for name, rows in tables.items():
        print(f"\n{name}\n{format_loop_table(rows)}")
        best = [r["best_generation"] for r in rows.get(REFERENCE, []) if r["best_generation"] is not None]
        if best:
            print(f"loop: held-back ensemble NLL lowest after generation 0 in {sum(g > 0 for g in best)} of "
                  f"{len(best)} seeds (generation of the minimum: {best})", flush=True)
    return tables
