"""evo_subens: neural-network ensembles from one trained parent, by evolving child subnetworks.

    >>> import evo_subens
    >>> result = evo_subens.run("configs/default.yaml", ["search.generations=2"])
    >>> result.metrics["ensemble"], result.population.head()
"""

from .config import RunConfig, load_config
from .errors import ConfigError, DataError, ParentFileError, RunDirError, UserError
from .runner import RunResult, run

__all__ = ["ConfigError", "DataError", "ParentFileError", "RunConfig", "RunDirError", "RunResult", "UserError",
           "load_config", "run"]
__version__ = "0.1.0"
