"""Experiment tracking: a run logged to MLflow and to TensorBoard through their own libraries.

Each tracker gets the run's parameters (the resolved config fields the run reads) when the run starts,
each generation's statistics once the generation is checkpointed, and at the end the final metrics and
the report (report.md and its plots) as artefacts. ``tracking.json`` in the run directory holds what has
been logged (the MLflow run id, the generations sent), so a resumed run logs into the same MLflow run
and sends only the generations not sent before; a kill between a checkpoint and its logging costs
nothing, as the resumed run sends that generation first.

EvoTorch ships loggers too (its ``MlflowLogger`` logs a searcher's ``status`` each step); the statistics
here are the engine's own (selection and held-back ensemble NLL, population fitness), which EvoTorch's
status does not hold, so the trackers are fed directly.
"""

from __future__ import annotations

import json
import math
import numbers
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import UserError
from .logs import config_columns, flatten_config
from .rundir import used_config, write_json
from .tracking_config import TrackingConfig

if TYPE_CHECKING:
    from .config import RunConfig

STATE_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"


def numbers_in(data: dict) -> dict[str, float]:
    """Every finite number in nested dicts, keyed by its dotted path (``ensemble.nll``); lists are left out."""
    return {key: float(value) for key, value in flatten_config(data).items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)}


class Tracker:
    """Where a run's parameters, per-generation statistics and results go."""

    def generation(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, metrics: dict[str, float], step: int, artefacts: list[Path]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the tracker holds (files, connections); the run may go on in a later process."""


class MlflowTracker(Tracker):
    """One MLflow run per evo_subens run, in ``tracking.experiment``, through ``MlflowClient``."""

    def __init__(self, cfg: TrackingConfig, output_dir: Path, run_name: str, params: dict[str, Any],
                 run_id: str | None):
        from mlflow.tracking import MlflowClient

        uri = cfg.mlflow_uri or f"sqlite:///{(output_dir / 'mlflow.db').absolute()}"
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None else self.client.create_experiment(
                cfg.experiment, artifact_location=None if cfg.mlflow_uri else
                (output_dir / "mlflow-artifacts").absolute().as_uri()))
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            for key, value in params.items():  # MLflow keeps params as strings of at most 6,000 characters
                self.client.log_param(run_id, key, str(value)[:6000])
        self.run_id, self.uri = run_id, uri

    def generation(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def finish(self, metrics: dict[str, float], step: int, artefacts: list[Path]) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, value, step=step)
        for path in artefacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)


class TensorBoardTracker(Tracker):
    """Event files in ``runs/<name>/tensorboard``: scalars per generation, final metrics, the config as
    text and the report's plots as images."""

    def __init__(self, run_dir: Path, params: dict[str, Any], first: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
        if first:
            table = "\n".join(f"| {key} | {value} |" for key, value in params.items())
            self.writer.add_text("config", "| field | value |\n| --- | --- |\n" + table, 0)

    def generation(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, metrics: dict[str, float], step: int, artefacts: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        for path in artefacts:
            if path.suffix == ".png":
                with Image.open(path) as image:
                    self.writer.add_image(f"report/{path.stem}", np.asarray(image.convert("RGB")), step,
                                          dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def generation_stats(checks: list[dict], records: Sequence, higher_is_better: bool) -> list[dict[str, float]]:
    """Per generation run: its check (metrics.json's ``search.generations`` entry, numbers only) as
    ``search/*`` and its candidates' best, median and worst fitness as ``population/fitness_*``."""
    stats = []
    for check in checks:
        values = {f"search/{key}": value for key, value in numbers_in(
            {k: v for k, v in check.items() if k not in ("generation", "candidate")}).items()}
        fitness = sorted(r.fitness for r in records if r.generation == check["generation"] and not math.isnan(r.fitness))
        if fitness:
            best, worst = (fitness[-1], fitness[0]) if higher_is_better else (fitness[0], fitness[-1])
            values.update({"population/fitness_best": best, "population/fitness_worst": worst,
                           "population/fitness_median": statistics.median(fitness)})
        stats.append(values)
    return stats


def report_artefacts(run_dir: Path) -> list[Path]:
    """The run's report (written now, without the slow feature pictures), its plots, config and metrics."""
    from ..report.run_report import write_report

    report = write_report(run_dir, features=False, progress=lambda line: None)
    return [report, *sorted(run_dir.glob("*.png")), run_dir / "config.yaml", run_dir / "metrics.json"]


class Trackers:
    """The trackers ``tracking`` turns on for one run directory, with what they have been sent."""

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path, extra: Sequence[Tracker],
             generations: Callable[[int], list[dict[str, float]]]) -> Trackers | None:
        """The trackers of ``cfg.tracking`` and ``extra`` (None: none), sent the generations already run."""
        if not (cfg.tracking.mlflow or cfg.tracking.tensorboard or extra):
            return None
        trackers = cls(cfg.tracking, run_dir, config_columns(used_config(cfg)), extra)
        trackers.generations(generations)
        return trackers

    def __init__(self, cfg: TrackingConfig, run_dir: Path, params: dict[str, Any], extra: Sequence[Tracker] = ()):
        self.run_dir = Path(run_dir)
        state = self._read_state()
        self.sent = int(state.get("generations_sent", 0))
        self.trackers: list[Tracker] = list(extra)
        if cfg.mlflow:
            mlflow = MlflowTracker(cfg, self.run_dir.parent, self.run_dir.name, params, state.get("mlflow_run_id"))
            self.trackers.append(mlflow)
            state["mlflow_run_id"], state["mlflow_uri"] = mlflow.run_id, mlflow.uri
        if cfg.tensorboard:
            self.trackers.append(TensorBoardTracker(self.run_dir, params, first="generations_sent" not in state))
        self.state = state
        self._save()

    def _read_state(self) -> dict:
        path = self.run_dir / STATE_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); remove it to log this run to a new tracking run") from None

    def _save(self) -> None:
        write_json(self.run_dir / STATE_FILE, dict(self.state, generations_sent=self.sent))

    def generations(self, stats_from: Callable[[int], list[dict[str, float]]]) -> None:
        """Send the generations not sent before: ``stats_from(first)`` gives the statistics of generations
        ``first``, ``first + 1``, ... (one dict each), so those sent are not computed again."""
        for values in stats_from(self.sent):
            for tracker in self.trackers:
                tracker.generation(self.sent, values)
            self.sent += 1
            self._save()

    def finish(self, metrics: dict, artefacts: list[Path]) -> None:
        """Send the final metrics (every number of ``metrics`` but the per-generation search record) and the
        artefacts, then close."""
        values = numbers_in({k: v for k, v in metrics.items() if k not in ("search", "numerics")})
        for tracker in self.trackers:
            tracker.finish(values, max(self.sent - 1, 0), artefacts)
        self.close()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
