"""evo_subens: neural-network ensembles from one trained parent, by evolving child subnetworks.

    >>> import evo_subens
    >>> result = evo_subens.run("configs/default.yaml", ["search.generations=2"])
    >>> result.metrics["ensemble"], result.population.head()
"""

from .config import RunConfig, load_config
from .errors import ConfigError, DataError, ParentFileError, RunDirError, UserError
from .ensemble import LoadedEnsemble, load_ensemble
from .logs import load_population, load_runs
from .runner import RunResult, grow, resume, run

__all__ = ["ConfigError", "DataError", "LoadedEnsemble", "ParentFileError", "RunConfig", "RunDirError",
           "RunResult", "UserError", "grow", "load_config", "load_ensemble", "load_population", "load_runs",
           "resume", "run"]
__version__ = "0.1.0"
