"""What an RL worker scores a candidate on (a light module: the config check reads it)."""

from __future__ import annotations

from ..base import Metric

# The mean return of a candidate's validation episodes (population log column val_return), and the
# environment steps those episodes took (val_env_steps: the evaluation's cost, never a criterion).
VALIDATION_METRICS = (Metric("return", higher_is_better=True),
                      Metric("env_steps", higher_is_better=False, label="steps", ranks=False))
