"""Packed bench: is a packed partition ensemble better than its parent at one model's cost?

Each folder holds ``packed-<M>[-<variant>].yaml`` configs of one data set and parent (e.g.
``configs/study/packed/mnist1d``: ``packed-4``, 4 members with disjoint shares; ``packed-8``, 8 members,
every unit in 2; ``packed-8-disjoint``, 8 members with disjoint shares). Per seed the first config trains
the parent; the others cut theirs from that same parent file (``model.parent_path``), so the rows of a
seed differ only in the packing. Every run is then distilled into a student (``evo-subens distill``,
defaults) and timed (``bench latency``, batch 256, one torch thread, about ``seconds`` of interleaved
rounds). The table gives per run test accuracy and NLL of parent, packed ensemble and student; parameters
and latency of the packed ensemble and the student as ratios to the parent's; and whether the run reached
the bar: packed NLL below the parent's with accuracy at least the parent's, at most 1.2x its latency and
no more parameters, and the student's NLL between parent's and ensemble's. Finished runs are read back,
so an interrupted bench goes on.

    evo-subens bench packed --configs configs/study/packed/mnist1d --seeds 0,1,2
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from ..core.config import load_config
from ..core.runner import run
from ..errors import UserError

LATENCY_BAR = 1.2


def _finished(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _packed_run(config: Path, overrides: list[str], run_dir: Path) -> dict:
    done = _finished(run_dir)
    if done is not None:
        return done
    if run_dir.exists():  # interrupted: start it again
        shutil.rmtree(run_dir)
    return run(config, overrides + [f"name={run_dir.name}", f"output_dir={run_dir.parent}"],
               progress=lambda line: None).metrics


def _student(run_dir: Path) -> dict:
    from ..distillation import distill

    path = run_dir / "student" / "metrics.json"
    if not path.is_file():
        distill(run_dir, progress=lambda line: None)
    return json.loads(path.read_text())


def _latency(run_dir: Path, seconds: float) -> dict[str, float]:
    from .latency import latency_rows

    # One thread: with more, timings on a shared 2-core machine swing by several times between runs.
    rows = latency_rows(run_dir, batches=(256,), threads=1, seconds=seconds)
    return {row["form"]: row["ratio"] for row in rows}


def study_row(config: Path, seed: int, output_dir: Path, parent_path: Path | None, seconds: float) -> dict:
    """One packed run of ``config`` at ``seed`` (its parent loaded from ``parent_path`` where given),
    distilled and timed: the table's cells."""
    overrides = [f"seed={seed}"] + ([f"model.parent_path={parent_path}"] if parent_path else [])
    run_dir = output_dir / f"{config.parent.name}-{config.stem}-s{seed}"
    metrics = _packed_run(config, overrides, run_dir)
    student = _student(run_dir)["test"]["student"]
    latency = _latency(run_dir, seconds)
    parent, ensemble, sizes = metrics["parent"], metrics["ensemble"], metrics["packed"]
    row = {"setting": config.parent.name, "config": config.stem, "seed": seed, "run_dir": str(run_dir),
           "parent_acc": parent["accuracy"], "parent_nll": parent["nll"],
           "packed_acc": ensemble["accuracy"], "packed_nll": ensemble["nll"],
           "student_acc": student["accuracy"], "student_nll": student["nll"],
           "params": sizes["packed"]["parameters"] / sizes["parent"]["parameters"],
           "latency": latency.get("packed"), "student_latency": latency.get("student")}
    row["reached"] = (row["packed_nll"] < row["parent_nll"] and row["packed_acc"] >= row["parent_acc"]
                      and row["latency"] is not None and row["latency"] <= LATENCY_BAR and row["params"] <= 1)
    row["student_between"] = row["packed_nll"] <= row["student_nll"] <= row["parent_nll"]
    return row


def format_packed_table(rows: list[dict]) -> str:
    """One line per run, then the mean of each setting and config over seeds."""
    head = (f"{'setting':<24}{'config':<10}{'seed':>5}{'parent acc/nll':>17}{'packed acc/nll':>17}"
            f"{'student acc/nll':>17}{'params':>8}{'lat.':>7}{'st.lat.':>8}{'reached':>9}{'student':>9}")
    lines = [head]

    def line(r: dict, seed: str) -> str:
        return (f"{r['setting']:<24}{r['config']:<10}{seed:>5}"
                f"{r['parent_acc']:>9.4f}/{r['parent_nll']:.4f}{r['packed_acc']:>9.4f}/{r['packed_nll']:.4f}"
                f"{r['student_acc']:>9.4f}/{r['student_nll']:.4f}{r['params']:>7.2f}x"
                f"{r['latency']:>6.2f}x{r['student_latency'] or float('nan'):>7.2f}x{str(r['reached']):>9}"
                f"{'between' if r['student_between'] is True else ('no' if r['student_between'] is False else r['student_between']):>9}")

    for r in rows:
        lines.append(line(r, str(r["seed"])))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["config"]), []).append(r)
    lines.append("mean over seeds:")
    for (setting, config), runs in groups.items():
        mean = {k: statistics.fmean(r[k] for r in runs) for k in
                ("parent_acc", "parent_nll", "packed_acc", "packed_nll", "student_acc", "student_nll", "params",
                 "latency")}
        mean["student_latency"] = statistics.fmean(r["student_latency"] for r in runs) if all(
            r["student_latency"] for r in runs) else None
        reached = f"{sum(r['reached'] for r in runs)}/{len(runs)}"
        between = f"{sum(r['student_between'] for r in runs)}/{len(runs)}"
        lines.append(line(dict(mean, setting=setting, config=config, reached=reached, student_between=between),
                          "all"))
    return "\n".join(lines)


def packed_bench(*, seeds: list[int], config_dirs: str, output_dir: str = "runs/study-packed",
                 seconds: float = 8.0) -> list[dict]:
    """Run every ``packed-*.yaml`` of each folder in ``config_dirs`` (comma-separated) for every seed, print
    the table (also written to ``output_dir/packed-table.txt``) and return its rows."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for folder in [Path(f) for f in config_dirs.split(",") if f.strip()]:
        try:
            configs = sorted(folder.glob("packed-*.yaml"), key=lambda p: (int(p.stem.split("-")[1]), p.stem))
        except ValueError:
            raise UserError(f"{folder}: packed configs are named packed-<members>[-<variant>].yaml") from None
        if not configs:
            raise UserError(f"no packed-<members>.yaml config in {folder}")
        for path in configs:
            if load_config(path).method != "packed":
                raise UserError(f"{path} is not a packed config (method: packed)")
        for seed in seeds:
            parent = None
            for path in configs:
                row = study_row(path, seed, out, parent, seconds)
                parent = parent or Path(row["run_dir"]) / "parent.pt"
                rows.append(row)
                print(format_packed_table(rows[-1:]).splitlines()[1], flush=True)
    table = format_packed_table(rows)
    (out / "packed-table.txt").write_text(table + "\n")
    print(table)
    return rows
