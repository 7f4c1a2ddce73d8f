"""The ``tracking`` config section, in a module of its own so that the run config and the trackers both
import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .options import option


@dataclass
class TrackingConfig:
    mlflow: bool = option(False, "log the search to MLflow (pip install -e '.[tracking]'): the config fields it "
                                 "reads as parameters, each generation's statistics, the final metrics, report.md "
                                 "and its plots as artefacts")
    mlflow_uri: str | None = option(None, "MLflow tracking URI (a tracking server, or a database); null = a SQLite "
                                          "store beside the run directories, sqlite:///<output_dir>/mlflow.db, with "
                                          "artefacts in <output_dir>/mlflow-artifacts")
    experiment: str = option("evo_subens", "the MLflow experiment runs are logged under")
    tensorboard: bool = option(False, "write the same to TensorBoard event files in runs/<name>/tensorboard "
                                      "(pip install -e '.[tracking]'): scalars, the config as text, the plots as "
                                      "images")

    def check(self) -> None:
        """The trackers asked for are installed (before any work, not at the end of a search)."""
        import importlib.util

        wanted = {"tracking.mlflow": ("mlflow", "sqlalchemy", "alembic") if self.mlflow else (),
                  "tracking.tensorboard": ("tensorboard",) if self.tensorboard else ()}
        for field_name, modules in wanted.items():
            missing = [name for name in modules if importlib.util.find_spec(name) is None]
            if missing:
                raise ConfigError(field_name, f"false, or the package(s) {', '.join(missing)} installed: "
                                              f"pip install -e '.[tracking]'", True)
