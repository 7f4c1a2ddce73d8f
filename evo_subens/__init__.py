"""evo_subens: neural-network ensembles from one trained parent, by evolving child subnetworks.

    >>> import evo_subens
    >>> result = evo_subens.run("configs/default.yaml", ["search.generations=2"])
    >>> result.metrics["ensemble"], result.population.head()
"""

from __future__ import annotations

import importlib
from typing import Any

from .core.config import RunConfig, load_config
from .errors import ConfigError, DataError, ParentFileError, RunDirError, UserError

# The engine (torch, Ray, EvoTorch) is imported on first use: the command line then validates its input
# and says what it is doing within a fraction of a second, instead of after seconds of imports.
# distill lives in the module distillation: a submodule named distill would replace the function as this
# package's attribute once imported.
_LAZY = {"Ensemble": "ensemble", "load_ensemble": "ensemble", "export_ensemble": "export",
         "distill": "distillation", "load_student": "distillation",
         "load_dataset": "tasks.classification.data", "load_population": "core.logs", "load_runs": "core.logs",
         "RunResult": "core.state", "grow": "core.runner", "resume": "core.runner", "run": "core.runner"}

__all__ = ["ConfigError", "DataError", "Ensemble", "ParentFileError", "RunConfig", "RunDirError",
           "RunResult", "UserError", "distill", "export_ensemble", "grow", "load_config", "load_dataset",
           "load_ensemble", "load_population", "load_runs", "load_student", "resume", "run"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
