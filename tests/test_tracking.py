"""Experiment tracking, read back with the trackers' own clients: MLflow's MlflowClient and TensorBoard's
EventAccumulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

import evo_subens
from conftest import TINY, deep_merge
from evo_subens.core.config import TrackingConfig
from evo_subens.errors import ConfigError

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")
from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TRACKED = deep_merge(TINY, {"search": {"generations": 3}, "tracking": {"mlflow": True, "tensorboard": True}})


def _mlflow(output_dir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{output_dir.absolute() / 'mlflow.db'}")


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_a_run_is_logged_to_mlflow_and_tensorboard(tmp_path: Path) -> None:
    """Parameters (the config fields the run reads), each generation's statistics, the final metrics of
    metrics.json and the report with its plots: in MLflow and in TensorBoard's event files."""
    result = evo_subens.run(deep_merge(TRACKED, {"output_dir": str(tmp_path), "name": "logged"}),
                            progress=lambda line: None)
    state = json.loads((result.run_dir / "tracking.json").read_text())
    assert state["generations_sent"] == 3

    client = _mlflow(tmp_path)
    [experiment] = [e for e in client.search_experiments() if e.name == "evo_subens"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == state["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == "logged"
    params = run.data.params
    assert params["search.population"] == "8" and params["children.sigma"] == "0.5"
    assert "env.id" not in params and "baseline.members" not in params  # fields a classification run never reads
    for key in ("population/fitness_best", "population/fitness_median", "search/val_accuracy"):
        assert _steps(client, run.info.run_id, key) == [0, 1, 2], key
    best = [m.value for m in client.get_metric_history(run.info.run_id, "search/val_accuracy")]
    assert best == [g["val_accuracy"] for g in result.metrics["search"]["generations"]]
    assert run.data.metrics["ensemble.nll"] == pytest.approx(result.metrics["ensemble"]["nll"])
    assert run.data.metrics["parent.accuracy"] == pytest.approx(result.metrics["parent"]["accuracy"])
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "fitness.png", "metrics.json", "config.yaml"} <= artefacts

    events = EventAccumulator(str(result.run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Scalars("population/fitness_best")] == [0, 1, 2]
    assert events.Scalars("ensemble.nll")[-1].value == pytest.approx(result.metrics["ensemble"]["nll"], rel=1e-6)
    assert "report/fitness" in events.Tags()["images"]
    assert "config/text_summary" in events.Tags()["tensors"]


@pytest.mark.slow
def test_a_killed_and_resumed_run_logs_each_generation_once(tmp_path: Path, cli_command: list[str]) -> None:
    """SIGKILL after generation 1, then resume: one MLflow run, every generation's statistics once, and the
    run finished; TensorBoard's event files hold each step once too."""
    config = tmp_path / "tracked.yaml"
    config.write_text(yaml.safe_dump(TRACKED))
    env = dict(os.environ, EVO_SUBENS_CRASH_AT="search.after_generation:2")
    killed = subprocess.run([*cli_command, "run", str(config), "name=killed"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp_path / "runs" / "killed"
    assert json.loads((run_dir / "tracking.json").read_text())["generations_sent"] == 2
    env.pop("EVO_SUBENS_CRASH_AT")
    resumed = subprocess.run([*cli_command, "resume", str(run_dir)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client = _mlflow(tmp_path / "runs")
    [run] = client.search_runs([client.get_experiment_by_name("evo_subens").experiment_id])
    assert run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "population/fitness_best") == [0, 1, 2]
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("population/fitness_best")] == [0, 1, 2]


def test_a_tracker_that_is_not_installed_is_a_config_error(monkeypatch) -> None:
    """Asking for a tracker whose package is missing stops before any work, naming the field and the
    install command."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracking.tensorboard.*pip install -e '\.\[tracking\]'"):
        TrackingConfig(tensorboard=True).check()
    TrackingConfig(mlflow=True).check()  # installed here
