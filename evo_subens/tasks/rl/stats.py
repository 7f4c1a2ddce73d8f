"""Statistics of episode returns, as the rliable paper recommends reporting them (Agarwal et al., "Deep RL at
the Edge of the Statistical Precipice", NeurIPS 2021): the interquartile mean, robust to the odd failed or
lucky episode yet less noisy than the median, with percentile-bootstrap confidence intervals.
"""

from __future__ import annotations

import inspect
from typing import Callable

import numpy as np
from scipy import stats as scipy_stats


def iqm(x: np.ndarray, axis: int | None = None) -> float | np.ndarray:
    """Interquartile mean: the mean of the middle 50% of ``x`` (flattened, or along ``axis``).

    Computed as rliable does, ``scipy.stats.trim_mean(x, 0.25)``: floor(n / 4) values are cut from each end,
    so for n not divisible by 4 slightly more than half the values are averaged."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        raise ValueError("the IQM of no values is undefined")
    if axis is None:
        return float(scipy_stats.trim_mean(x.ravel(), 0.25))
    return scipy_stats.trim_mean(x, 0.25, axis=axis)


def _accepts_axis(stat: Callable) -> bool:
    try:
        return "axis" in inspect.signature(stat).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return False


def bootstrap_ci(x: np.ndarray, stat: Callable[..., float], n: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of ``stat`` over ``x``: ``stat`` of ``n`` resamples of ``x``
    (with replacement, drawn from a generator seeded by ``seed``), and their (1 - level) / 2 and
    (1 + level) / 2 quantiles. A ``stat`` taking ``axis`` (``np.mean``, :func:`iqm`) is applied to all
    resamples at once."""
    x = np.asarray(x, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("a bootstrap needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    rng = np.random.default_rng(seed)
    resamples = x[rng.integers(0, x.size, size=(n, x.size))]
    if _accepts_axis(stat):
        values = np.asarray(stat(resamples, axis=1), dtype=float)
    else:
        values = np.array([stat(row) for row in resamples], dtype=float)
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def summarise(returns: np.ndarray, seed: int = 0) -> dict:
    """``{"episodes", "mean", "std", "median", "iqm", "ci95": {"mean": [low, high], "iqm": [low, high]}}`` of
    episode returns (plain floats, ready for JSON); the intervals are 95% percentile bootstraps."""
    x = np.asarray(returns, dtype=float).ravel()
    return {"episodes": int(x.size), "mean": float(x.mean()), "std": float(x.std()),
            "median": float(np.median(x)), "iqm": iqm(x),
            "ci95": {"mean": list(bootstrap_ci(x, np.mean, seed=seed)),
                     "iqm": list(bootstrap_ci(x, iqm, seed=seed))}}
